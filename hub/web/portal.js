// The customer portal: sign in with a customer token, the shipment list with filters,
// a shipment's page, all kept live by /v1/portal/stream. Routes are fragments:
// #/ (list), #/s/<id> (a shipment); #token=<t> signs in and is removed from the URL.
'use strict';

(function () {
  const { el, $, show, clear, api, fmtTime, fmtWindow } = FS;
  const KEY = 'fleetsync.portal.token';
  const TRACK_MAX = 500;
  let token = FS.tokenFor(KEY);
  let statusesLoaded = false;
  let live = null;
  let next = null; // the list's next cursor
  const views = new Map(); // id -> newest view seen (by rev)
  const summaries = new Map(); // id -> list row data
  const tracks = new Map(); // id -> [[lat, lon]] seen since the page opened
  let openId = null;

  function route() {
    const h = location.hash || '#/';
    const m = /^#\/s\/(.+)$/.exec(h);
    return m ? { page: 'detail', id: decodeURIComponent(m[1]) } : { page: 'list' };
  }

  function signedOut(msg) {
    token = null;
    FS.setToken(KEY, null);
    if (live) { live.close(); live = null; }
    show('list', false); show('detail', false); show('signout', false); show('live', false);
    show('signin', true);
    const err = $('signin-error');
    err.hidden = !msg;
    err.textContent = msg || '';
    $('token').focus();
  }

  async function start() {
    if (!token) { signedOut(); return; }
    const r = await api('/v1/portal/statuses', { token });
    if (r.status === 401) { signedOut('That token was not accepted. Check it and try again.'); return; }
    if (r.status === 403) { signedOut('That is not a customer token: the portal needs the token of a customer credential.'); return; }
    if (r.status !== 200) { signedOut('The portal is not reachable now (' + (r.error || r.status) + '). Try again shortly.'); return; }
    show('signin', false); show('signout', true);
    if (!statusesLoaded) {
      const sel = $('f-status');
      for (const s of r.body.statuses) sel.append(el('option', { value: s, text: s }));
      statusesLoaded = true;
    }
    if (!live) openStream();
    render();
  }

  function openStream() {
    FS.live(false, 'Connecting…');
    live = FS.stream('/v1/portal/stream', token, {
      onState: (on) => FS.live(on),
      onGone: (status) => { if (status === 401 || status === 403) signedOut('Your access was withdrawn. Sign in again.'); },
      onEvent: (name, data) => {
        if (name === 'shipment') shipmentChanged(data);
        else if (name === 'position') positionChanged(data.shipment_id, data.vehicle);
      },
    });
  }

  function shipmentChanged(v) {
    const old = views.get(v.id);
    if (old && old.rev > v.rev) return;
    views.set(v.id, v);
    const row = { id: v.id, reference: v.reference, status: v.status, rev: v.rev, updated: v.updated,
      eta_window: v.next_stop ? v.next_stop.eta_window : null };
    const known = summaries.has(v.id);
    summaries.set(v.id, row);
    if (known || matches(row)) renderRow(row, !known);
    if (openId === v.id) renderDetail(v);
  }

  function positionChanged(id, vehicle) {
    if (!vehicle) return;
    const t = tracks.get(id) || [];
    t.push([vehicle.lat, vehicle.lon]);
    if (t.length > TRACK_MAX) t.splice(0, t.length - TRACK_MAX);
    tracks.set(id, t);
    const v = views.get(id);
    if (v) { v.vehicle = vehicle; if (openId === id) renderDetail(v); }
  }

  // The list.
  function matches(row) {
    const st = $('f-status').value, ref = $('f-ref').value.trim().toLowerCase();
    return (!st || row.status === st) && (!ref || row.reference.toLowerCase().includes(ref));
  }

  function rowNode(row) {
    return el('li', { id: 'row-' + row.id, 'data-id': row.id },
      el('a', { class: 'row', href: '#/s/' + encodeURIComponent(row.id) },
        el('div', { class: 'row-head' },
          el('span', { class: 'ref', text: row.reference }),
          el('span', { class: 'badge ' + FS.statusClass(row.status), text: row.status })),
        el('dl', { class: 'kv' },
          row.eta_window ? [el('dt', {}, 'Expected'), el('dd', {}, fmtWindow(row.eta_window))] : null,
          el('dt', {}, 'Updated'), el('dd', {}, fmtTime(row.updated)))));
  }

  function renderRow(row, isNew) {
    const ul = $('shipments');
    const old = document.getElementById('row-' + row.id);
    const node = rowNode(row);
    node.hidden = !matches(row);
    if (old) old.replaceWith(node);
    else if (isNew) ul.prepend(node);
    else ul.append(node);
    $('list-empty').hidden = !!ul.querySelector('li:not([hidden])');
  }

  async function loadList(more) {
    const st = $('f-status').value;
    const q = new URLSearchParams({ limit: '50' });
    if (st) q.set('state', st);
    if (more && next) q.set('cursor', next);
    const r = await api('/v1/portal/shipments?' + q, { token });
    if (r.status === 401) { signedOut('Your access was withdrawn. Sign in again.'); return; }
    const err = $('list-error');
    if (r.status !== 200) {
      err.hidden = false;
      err.textContent = r.status === 429 ? 'Too many requests: wait ' + (r.retryAfter || 1) + ' s and try again.' : 'Could not load your shipments (' + (r.error || r.status) + ').';
      return;
    }
    err.hidden = true;
    if (!more) { clear($('shipments')); }
    for (const s of r.body.shipments) {
      const cur = summaries.get(s.id);
      const row = cur && cur.rev > s.rev ? cur : s;
      summaries.set(s.id, row);
      renderRow(row, false);
    }
    next = r.body.next;
    $('more').hidden = !next;
    $('list-empty').hidden = !!$('shipments').querySelector('li:not([hidden])');
  }

  function filterRows() {
    for (const li of $('shipments').children) {
      const row = summaries.get(li.dataset.id);
      li.hidden = !row || !matches(row);
    }
    $('list-empty').hidden = !!$('shipments').querySelector('li:not([hidden])');
  }

  // A shipment.
  function renderDetail(v) {
    const box = $('shipment');
    clear(box);
    box.append(FS.shipmentView(v, { track: tracks.get(v.id) || [] }));
  }

  async function loadDetail(id) {
    const box = $('shipment');
    clear(box);
    box.append(el('p', { class: 'muted' }, 'Loading…'));
    $('share-out').hidden = true;
    const r = await api('/v1/portal/shipments/' + encodeURIComponent(id), { token });
    if (openId !== id) return;
    clear(box);
    if (r.status === 401) { signedOut('Your access was withdrawn. Sign in again.'); return; }
    if (r.status === 404) { box.append(el('p', { class: 'error', role: 'alert' }, 'There is no such shipment among yours.')); return; }
    if (r.status !== 200) { box.append(el('p', { class: 'error', role: 'alert' }, 'Could not load the shipment (' + (r.error || r.status) + ').')); return; }
    const cur = views.get(id);
    const v = cur && cur.rev > r.body.rev ? cur : r.body;
    views.set(id, v);
    renderDetail(v);
    const h = document.getElementById('detail-title');
    if (h) { h.tabIndex = -1; h.focus(); }
  }

  function render() {
    if (!token) return;
    const r = route();
    if (r.page === 'detail') {
      openId = r.id;
      show('list', false); show('detail', true);
      loadDetail(r.id);
    } else {
      openId = null;
      show('detail', false); show('list', true);
      loadList(false);
    }
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const t = $('token').value.trim();
      if (!t) return;
      token = t;
      FS.setToken(KEY, t);
      $('token').value = '';
      start();
    });
    $('signout').addEventListener('click', () => signedOut());
    $('f-status').addEventListener('change', () => loadList(false));
    $('f-ref').addEventListener('input', filterRows);
    $('filters').addEventListener('submit', (e) => e.preventDefault());
    $('more').addEventListener('click', () => loadList(true));
    $('share').addEventListener('click', async () => {
      if (!openId) return;
      const r = await api('/v1/portal/shipments/' + encodeURIComponent(openId) + '/links', { token, method: 'POST', body: { ttl_s: 172800 } });
      const out = $('share-out'), input = $('share-url');
      out.hidden = false;
      input.value = r.status === 201 ? location.origin + r.body.url : 'Could not make a link: ' + (r.error || r.status);
      input.focus();
      input.select();
    });
    let resized = null;
    window.addEventListener('resize', () => {
      clearTimeout(resized);
      // The map's canvas follows the screen's width.
      resized = setTimeout(() => { const v = openId && views.get(openId); if (v) renderDetail(v); }, 150);
    });
    window.addEventListener('hashchange', () => {
      const t = FS.tokenFor(KEY);
      if (t && t !== token) {
        token = t;
        if (live) { live.close(); live = null; }
        views.clear(); summaries.clear(); tracks.clear();
        start();
        return;
      }
      render();
    });
    start();
  });
})();
