// The operator console: the fleet (map and devices), stuck shipments, the review queue
// with its evidence and accept/reject, and the outbox's dead letters with replay. The
// operator API has no stream: the console reads it every POLL_MS while the tab is open.
'use strict';

(function () {
  const { el, $, show, clear, api, fmtTime, ago } = FS;
  const KEY = 'fleetsync.console.token';
  const POLL_MS = 2500;
  const REVIEW_LIMIT = 50;
  let token = FS.tokenFor(KEY);
  let timer = null;
  const evidence = new Map(); // review id -> evidence node (loaded once)
  const objectUrls = new Map(); // review id -> [blob: URLs] to release

  function signedOut(msg) {
    token = null;
    FS.setToken(KEY, null);
    if (timer) { clearTimeout(timer); timer = null; }
    show('board', false); show('nav', false); show('signout', false); show('live', false);
    show('signin', true);
    const err = $('signin-error');
    err.hidden = !msg;
    err.textContent = msg || '';
    $('token').focus();
  }

  function problem(where, r) {
    const box = $('board-error');
    box.hidden = false;
    box.textContent = where + ': ' + (r.status === 0 ? 'the hub is not reachable' : (r.error || ('HTTP ' + r.status)));
  }

  async function start() {
    if (!token) { signedOut(); return; }
    const r = await api('/v1/ops/devices', { token });
    if (r.status === 401) { signedOut('That token was not accepted. Check it and try again.'); return; }
    if (r.status === 403) { signedOut('That token is not an operator\'s: ' + (r.error || 'forbidden')); return; }
    show('signin', false); show('board', true); show('nav', true); show('signout', true);
    poll();
  }

  let pollGen = 0;
  async function poll() {
    if (!token) return;
    const gen = ++pollGen; // a newer poll (a filter changed) supersedes this one
    const [dev, stuck, review, dead] = await Promise.all([
      api('/v1/ops/devices', { token }),
      api('/v1/ops/shipments/stuck' + ($('stuck-age').value ? '?older_than_s=' + $('stuck-age').value : ''), { token }),
      api('/v1/ops/review?status=open&limit=' + REVIEW_LIMIT, { token }),
      api('/v1/ops/deadletters?limit=100', { token }),
    ]);
    if (gen !== pollGen || !token) return;
    if ([dev, stuck, review, dead].some((r) => r.status === 401)) { signedOut('Your access was withdrawn. Sign in again.'); return; }
    const bad = [['Devices', dev], ['Stuck shipments', stuck], ['Review queue', review], ['Dead letters', dead]].find((x) => x[1].status !== 200);
    if (bad) problem(bad[0], bad[1]); else $('board-error').hidden = true;
    FS.live(!bad, bad ? 'Not up to date' : 'Live · ' + new Date().toLocaleTimeString());
    if (dev.status === 200) renderFleet(dev.body);
    if (stuck.status === 200) renderStuck(stuck.body);
    if (review.status === 200) renderReview(review.body);
    if (dead.status === 200) renderDead(dead.body);
    timer = setTimeout(poll, POLL_MS);
  }

  // Fleet.
  function renderFleet(devices) {
    $('fleet-count').textContent = '(' + devices.filter((d) => d.connected).length + ' of ' + devices.length + ' connected)';
    const placed = devices.filter((d) => d.position);
    const map = FS.drawMap({
      vehicles: placed.map((d) => ({ lat: d.position.lat, lon: d.position.lon, label: d.id, cls: d.connected ? '' : 'off' })),
      label: 'Map of the fleet: ' + placed.length + ' vehicles with a position',
      minSpanM: 1000,
    });
    const box = $('fleet-map');
    clear(box);
    box.append(map, el('ul', { class: 'legend' }, el('li', {}, el('span', { class: 'dot on', 'aria-hidden': 'true' }), 'connected'), el('li', {}, el('span', { class: 'dot off', 'aria-hidden': 'true' }), 'not connected')));
    const ul = $('devices');
    clear(ul);
    for (const d of devices) {
      const h = d.health;
      const backlog = h ? h.backlog_critical + h.backlog_telemetry : null;
      ul.append(el('li', { id: 'dev-' + d.id },
        el('div', { class: 'row-head' },
          el('strong', { text: d.id }),
          el('span', { class: 'badge ' + (d.connected ? 'ok' : 'bad'), text: d.connected ? 'connected' : 'not connected' })),
        el('dl', { class: 'kv' },
          el('dt', {}, 'Last seen'), el('dd', {}, ago(d.last_seen)),
          el('dt', {}, 'Backlog'), el('dd', {}, backlog === null ? 'unknown' : backlog + ' events' + (h.backlog_critical ? ' (' + h.backlog_critical + ' critical)' : '')),
          el('dt', {}, 'Version'), el('dd', {}, h ? h.version : 'unknown'),
          el('dt', {}, 'Position'), el('dd', {}, d.position ? fmtTime(d.position.time) + (d.position.speed_mps !== null ? ', ' + Math.round(d.position.speed_mps * 3.6) + ' km/h' : '') : 'none yet'))));
    }
    if (!devices.length) ul.append(el('li', { class: 'muted' }, 'No device has connected yet.'));
  }

  // Stuck shipments.
  const REASON = {
    released_not_dispatched: 'Released, on no vehicle',
    dispatched_not_acknowledged: 'Vehicle has not acknowledged',
    delivered_without_pod: 'Delivered, POD not confirmed',
    waiting_in_review: 'Waiting in review',
  };
  function renderStuck(body) {
    const list = body.shipments || [];
    $('stuck-count').textContent = '(' + list.length + ')';
    const ul = $('stuck-list');
    clear(ul);
    for (const s of list) {
      ul.append(el('li', {},
        el('div', { class: 'row-head' }, el('strong', { text: s.shipment_id }), el('span', { class: 'badge warn', text: REASON[s.reason] || s.reason })),
        el('dl', { class: 'kv' },
          el('dt', {}, 'State'), el('dd', {}, s.state),
          el('dt', {}, 'Vehicle'), el('dd', {}, s.vehicle || 'none'),
          el('dt', {}, 'Since'), el('dd', {}, fmtTime(s.since) + ' (' + ago(s.since) + ')'))));
    }
    if (!list.length) ul.append(el('li', { class: 'muted' }, 'Nothing is stuck.'));
  }

  // Review queue: items stay in the DOM while open, so a note being typed survives polls.
  function renderReview(items) {
    $('review-count').textContent = '(' + items.length + ' open)';
    const ul = $('review-list');
    const ids = new Set(items.map((i) => i.id));
    for (const li of Array.from(ul.children)) {
      if (li.dataset.id && !ids.has(li.dataset.id) && !li.dataset.decided) { release(li.dataset.id); li.remove(); }
      if (!li.dataset.id) li.remove();
    }
    for (const item of items) {
      if (!document.getElementById('rev-' + item.id)) ul.append(reviewNode(item));
    }
    if (!ul.children.length) ul.append(el('li', { class: 'muted' }, 'The review queue is empty.'));
  }

  function reviewNode(item) {
    const noteId = 'note-' + item.id;
    const msg = el('p', { class: 'muted', role: 'status', 'aria-live': 'polite' });
    const note = el('input', { id: noteId, type: 'text', maxlength: '1000', placeholder: 'e.g. customer confirmed by phone', required: true });
    const decide = async (accept, btns) => {
      const text = note.value.trim();
      if (!text) { msg.className = 'error'; msg.textContent = 'Write a note first: why you ' + (accept ? 'accept' : 'reject') + ' this.'; note.focus(); return; }
      btns.forEach((b) => { b.disabled = true; });
      const r = await api('/v1/ops/review/' + encodeURIComponent(item.id) + '/' + (accept ? 'accept' : 'reject'), { token, method: 'POST', body: { note: text } });
      if (r.status === 200) {
        li.dataset.decided = '1';
        msg.className = 'ok';
        msg.textContent = (accept ? 'Accepted' : 'Rejected') + ' by ' + (r.body.decided_by || 'you') + '.';
        note.disabled = true;
        setTimeout(() => { release(item.id); li.remove(); }, 4000);
      } else {
        btns.forEach((b) => { b.disabled = false; });
        msg.className = 'error';
        msg.textContent = 'Not done: ' + (r.error || ('HTTP ' + r.status));
      }
    };
    const acceptBtn = el('button', { type: 'button', class: 'accept' }, 'Accept');
    const rejectBtn = el('button', { type: 'button', class: 'danger reject' }, 'Reject');
    acceptBtn.addEventListener('click', () => decide(true, [acceptBtn, rejectBtn]));
    rejectBtn.addEventListener('click', () => decide(false, [acceptBtn, rejectBtn]));
    const ev = el('div', { class: 'evidence' }, el('p', { class: 'muted' }, 'Loading evidence…'));
    const li = el('li', { id: 'rev-' + item.id, 'data-id': item.id },
      el('div', { class: 'row-head' },
        el('strong', { text: item.shipment_id ? 'Shipment ' + item.shipment_id : 'No shipment' }),
        el('span', { class: 'badge warn', text: item.kind.replace(/_/g, ' ') })),
      el('p', {}, item.rule),
      el('dl', { class: 'kv' },
        item.stop_id ? [el('dt', {}, 'Stop'), el('dd', {}, item.stop_id)] : null,
        el('dt', {}, 'Event'), el('dd', {}, fmtTime(item.event_time)),
        el('dt', {}, 'Seen'), el('dd', {}, item.detail)),
      ev,
      el('label', { for: noteId }, 'Note (why)'), note,
      el('div', { class: 'actions' }, acceptBtn, rejectBtn),
      msg);
    loadEvidence(item, ev);
    return li;
  }

  function release(id) {
    for (const u of objectUrls.get(id) || []) URL.revokeObjectURL(u);
    objectUrls.delete(id);
    evidence.delete(id);
  }

  async function loadEvidence(item, box) {
    const r = await api('/v1/ops/review/' + encodeURIComponent(item.id), { token });
    clear(box);
    if (r.status !== 200) { box.append(el('p', { class: 'error' }, 'Evidence not available: ' + (r.error || r.status))); return; }
    const e = r.body.evidence;
    const parts = [];
    const pod = e.event && e.event.kind === 'pod' ? e.event : null;
    if (pod) {
      parts.push(el('p', {}, 'POD: ' + (pod.outcome || '') + (pod.recipient_name ? ', received by ' + pod.recipient_name : '') + ', ' + fmtTime(pod.event_time)));
    } else if (e.event) {
      parts.push(el('p', {}, 'Event: ' + e.event.kind + ', ' + fmtTime(e.event.event_time)));
    }
    const track = (e.positions || []).filter((p) => typeof p.lat === 'number').map((p) => [p.lat, p.lon]);
    const geo = pod && pod.geo ? pod.geo : null;
    if (track.length || geo) {
      parts.push(FS.drawMap({
        track,
        stops: geo ? [{ lat: geo.lat, lon: geo.lon, label: 'POD', cls: 'next' }] : [],
        vehicles: track.length ? [{ lat: track[track.length - 1][0], lon: track[track.length - 1][1], label: '' }] : [],
        label: 'Evidence map: ' + track.length + ' positions of the vehicle around the event' + (geo ? ' and where the POD was captured' : ''),
      }));
    }
    const imgs = el('div', {});
    parts.push(imgs);
    box.append(...parts);
    const urls = [];
    for (const [i, u] of (e.blob_urls || []).entries()) {
      try {
        const res = await fetch(u, { headers: { Authorization: 'Bearer ' + token }, cache: 'no-store', credentials: 'omit' });
        if (!res.ok) continue;
        const bytes = new Uint8Array(await res.arrayBuffer());
        const type = bytes[0] === 0x89 ? 'image/png' : (bytes[0] === 0xff ? 'image/jpeg' : 'application/octet-stream');
        const url = URL.createObjectURL(new Blob([bytes], { type }));
        urls.push(url);
        if (type !== 'application/octet-stream') imgs.append(el('img', { src: url, alt: 'POD evidence ' + (i + 1) }));
      } catch (err) { /* the image stays out */ }
    }
    objectUrls.set(item.id, urls);
  }

  // Dead letters.
  function renderDead(letters) {
    $('dead-count').textContent = '(' + letters.length + ')';
    $('replay-all').hidden = !letters.length;
    const ul = $('dead-list');
    clear(ul);
    for (const d of letters) {
      const btn = el('button', { type: 'button', class: 'secondary', 'aria-label': 'Replay ' + d.milestone + ' of ' + d.shipment_id + ' to ' + d.sink }, 'Replay');
      const msg = el('span', { class: 'muted', role: 'status' });
      btn.addEventListener('click', async () => {
        btn.disabled = true;
        const r = await api('/v1/ops/deadletters/' + encodeURIComponent(d.id) + '/replay', { token, method: 'POST', body: {} });
        msg.textContent = r.status === 200 ? ' Replayed.' : ' Not replayed: ' + (r.error || r.status);
        if (r.status !== 200) btn.disabled = false;
      });
      ul.append(el('li', {},
        el('div', { class: 'row-head' }, el('strong', { text: d.shipment_id + ' · ' + d.milestone }), el('span', { class: 'badge bad', text: d.sink })),
        el('dl', { class: 'kv' },
          el('dt', {}, 'Attempts'), el('dd', {}, String(d.attempts)),
          el('dt', {}, 'Error'), el('dd', {}, d.error),
          d.response ? [el('dt', {}, 'Answer'), el('dd', { class: 'mono' }, d.response.slice(0, 300))] : null,
          el('dt', {}, 'Dead since'), el('dd', {}, fmtTime(d.dead))),
        btn, msg));
    }
    if (!letters.length) ul.append(el('li', { class: 'muted' }, 'No dead letters.'));
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
    $('stuck-filter').addEventListener('submit', (e) => e.preventDefault());
    $('stuck-age').addEventListener('change', () => { if (timer) { clearTimeout(timer); timer = null; } poll(); });
    $('replay-all').addEventListener('click', async () => {
      const btn = $('replay-all');
      btn.disabled = true;
      const r = await api('/v1/ops/deadletters/replay', { token, method: 'POST', body: {} });
      btn.disabled = false;
      if (r.status !== 200) problem('Replay all', r);
    });
    start();
  });
})();
