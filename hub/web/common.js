// fleetsync pages: the shared parts. DOM helpers, the JSON API with a bearer token, a
// Server-Sent Events reader over fetch (EventSource cannot send Authorization), the
// tile-less SVG map with a scale bar, and the shipment view the portal and the tracking
// page both show. No framework, no build step; everything this origin only.
'use strict';

window.FS = (function () {
  const SVG_NS = 'http://www.w3.org/2000/svg';

  // el('p', {class: 'x', text: 'hi'}, child, ...): an element. Attributes named on* are
  // listeners; `text` is textContent. Never HTML from data.
  function make(doc, ns, tag, attrs, children) {
    const e = ns ? doc.createElementNS(ns, tag) : doc.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') e.textContent = String(v);
      else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(typeof c === 'string' ? document.createTextNode(c) : c);
    }
    return e;
  }
  const el = (tag, attrs, ...children) => make(document, null, tag, attrs, children);
  const svg = (tag, attrs, ...children) => make(document, SVG_NS, tag, attrs, children);
  const $ = (id) => document.getElementById(id);
  function show(id, on) { const e = $(id); if (e) e.hidden = !on; }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // Times.
  const two = (n) => String(n).padStart(2, '0');
  function hm(d) { return two(d.getHours()) + ':' + two(d.getMinutes()); }
  function fmtTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (isNaN(d)) return '';
    const now = new Date();
    const sameDay = d.toDateString() === now.toDateString();
    const day = sameDay ? 'today' : d.toLocaleDateString(undefined, { weekday: 'short', day: 'numeric', month: 'short' });
    return day + ' ' + hm(d);
  }
  function fmtWindow(w) {
    if (!w) return '';
    const a = new Date(w.earliest || w.start), b = new Date(w.latest || w.end);
    if (isNaN(a) || isNaN(b)) return '';
    return fmtTime(a.toISOString()) + ' – ' + (a.toDateString() === b.toDateString() ? hm(b) : fmtTime(b.toISOString()));
  }
  function ago(iso) {
    if (!iso) return 'never';
    const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    if (s < 86400) return Math.round(s / 3600) + ' h ago';
    return fmtTime(iso);
  }

  // Tokens: per tab, never cookies. A token may arrive in the URL's fragment
  // (#token=...), which no request carries; it is moved to sessionStorage at once.
  function tokenFor(key) {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      try { sessionStorage.setItem(key, decodeURIComponent(m[1])); } catch (e) { /* private mode */ }
      history.replaceState(null, '', location.pathname + location.search + '#/');
    }
    try { return sessionStorage.getItem(key); } catch (e) { return null; }
  }
  function setToken(key, t) { try { if (t) sessionStorage.setItem(key, t); else sessionStorage.removeItem(key); } catch (e) { /* private mode */ } }

  // The JSON API: {status, body, retryAfter}. Network failures are status 0.
  async function api(path, opts) {
    const o = opts || {};
    const headers = { Accept: 'application/json' };
    if (o.token) headers.Authorization = 'Bearer ' + o.token;
    let body;
    if (o.body !== undefined) { headers['Content-Type'] = 'application/json'; body = JSON.stringify(o.body); }
    let r;
    try {
      r = await fetch(path, { method: o.method || 'GET', headers, body, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      return { status: 0, body: null, error: 'the hub is not reachable' };
    }
    let json = null;
    try { json = await r.json(); } catch (e) { json = null; }
    return { status: r.status, body: json, retryAfter: Number(r.headers.get('Retry-After')) || 0,
      error: json && (json.detail || json.error) };
  }

  // A Server-Sent Events stream over fetch, resumed with Last-Event-ID after a drop.
  // handlers: onEvent(name, data, id), onState(live: bool), onGone(status) for a 401,
  // 403 or 404 (the stream is not coming back).
  function stream(path, token, handlers) {
    let lastId = null, stopped = false, ctrl = null, backoff = 1000;
    async function once() {
      ctrl = new AbortController();
      const headers = { Accept: 'text/event-stream' };
      if (token) headers.Authorization = 'Bearer ' + token;
      if (lastId) headers['Last-Event-ID'] = lastId;
      let r;
      try {
        r = await fetch(path, { headers, cache: 'no-store', credentials: 'omit', signal: ctrl.signal });
      } catch (e) { return 'retry'; }
      if (r.status === 401 || r.status === 403 || r.status === 404) {
        try { await r.body.cancel(); } catch (e) { /* gone */ }
        return r.status;
      }
      if (!r.ok || !r.body) {
        const wait = Number(r.headers.get('Retry-After')) || 0;
        try { await r.body.cancel(); } catch (e) { /* gone */ }
        if (wait) backoff = Math.max(backoff, wait * 1000);
        return 'retry';
      }
      handlers.onState && handlers.onState(true);
      backoff = 1000;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n?/g, '\n');
          let end;
          while ((end = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let name = 'message', id = null, data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith(':')) continue;
              const i = line.indexOf(':');
              const f = i < 0 ? line : line.slice(0, i);
              const v = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
              if (f === 'event') name = v;
              else if (f === 'id') id = v;
              else if (f === 'data') data += (data ? '\n' : '') + v;
            }
            if (id !== null) lastId = id;
            if (!data) continue;
            let parsed;
            try { parsed = JSON.parse(data); } catch (e) { continue; }
            try { handlers.onEvent(name, parsed, id); } catch (e) { reportError(e); }
          }
        }
      } catch (e) { /* dropped or stopped */ }
      return 'retry';
    }
    (async function loop() {
      while (!stopped) {
        const res = await once();
        if (stopped) return;
        handlers.onState && handlers.onState(false);
        if (res !== 'retry') { handlers.onGone && handlers.onGone(res); return; }
        await new Promise((ok) => setTimeout(ok, backoff + Math.random() * 500));
        backoff = Math.min(backoff * 2, 30000);
      }
    })();
    return { close() { stopped = true; if (ctrl) ctrl.abort(); } };
  }

  function live(on, text) {
    const e = $('live');
    if (!e) return;
    e.hidden = false;
    e.classList.toggle('off', !on);
    e.textContent = text || (on ? 'Live' : 'Reconnecting…');
  }

  // The map: Web Mercator, fitted to what it shows, no tiles. A grid whose squares are as
  // long as the scale bar stands in for the ground.
  const EARTH_M = 40075016.686;
  function merc(lat, lon) {
    const s = Math.sin(lat * Math.PI / 180);
    return [(lon + 180) / 360, 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)];
  }
  function niceMeters(m) {
    const p = Math.pow(10, Math.floor(Math.log10(m)));
    for (const k of [5, 2, 1]) if (k * p <= m) return k * p;
    return p;
  }
  function fmtMeters(m) { return m >= 1000 ? (m / 1000) + ' km' : m + ' m'; }
  function distM(a, b) {
    const R = 6371000, r = Math.PI / 180;
    const dlat = (b[0] - a[0]) * r, dlon = (b[1] - a[1]) * r;
    const h = Math.sin(dlat / 2) ** 2 + Math.cos(a[0] * r) * Math.cos(b[0] * r) * Math.sin(dlon / 2) ** 2;
    return 2 * R * Math.asin(Math.sqrt(h));
  }
  // spec: {stops: [{lat, lon, label, cls}], track: [[lat, lon]], vehicles: [{lat, lon,
  // label, cls}], label: text for screen readers, minSpanM}
  function drawMap(spec) {
    // Narrow screens get a smaller canvas, so labels keep their size when it is scaled.
    const W = spec.width || (window.innerWidth < 600 ? 340 : 640);
    const H = Math.round(W * 0.625), PAD = W < 600 ? 30 : 44;
    const pts = [];
    for (const s of spec.stops || []) pts.push([s.lat, s.lon]);
    for (const v of spec.vehicles || []) pts.push([v.lat, v.lon]);
    for (const t of spec.track || []) pts.push(t);
    const root = svg('svg', { class: 'map', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': spec.label || 'Map' });
    root.append(svg('title', { text: spec.label || 'Map' }));
    if (!pts.length) {
      root.append(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'label', text: 'No positions yet' }));
      return root;
    }
    const xy = pts.map((p) => merc(p[0], p[1]));
    let x0 = Math.min(...xy.map((p) => p[0])), x1 = Math.max(...xy.map((p) => p[0]));
    let y0 = Math.min(...xy.map((p) => p[1])), y1 = Math.max(...xy.map((p) => p[1]));
    const lat = pts.reduce((a, p) => a + p[0], 0) / pts.length;
    const mPerUnit = EARTH_M * Math.cos(lat * Math.PI / 180);
    const minSpan = (spec.minSpanM || 600) / mPerUnit;
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    let span = Math.max(x1 - x0, (y1 - y0) * (W - 2 * PAD) / (H - 2 * PAD), minSpan);
    const scale = (W - 2 * PAD) / span; // px per unit
    const px = (p) => { const m = merc(p[0], p[1]); return [W / 2 + (m[0] - cx) * scale, H / 2 + (m[1] - cy) * scale]; };
    const mPerPx = mPerUnit / scale;
    const bar = niceMeters(mPerPx * W / 4);
    const barPx = bar / mPerPx;
    // Grid.
    const g = svg('g', { class: 'grid', 'aria-hidden': 'true' });
    for (let x = (W / 2) % barPx; x < W; x += barPx) g.append(svg('line', { x1: x, y1: 0, x2: x, y2: H }));
    for (let y = (H / 2) % barPx; y < H; y += barPx) g.append(svg('line', { x1: 0, y1: y, x2: W, y2: y }));
    root.append(g);
    // Track.
    if ((spec.track || []).length > 1) {
      root.append(svg('polyline', { class: 'track', points: spec.track.map((t) => px(t).map((n) => n.toFixed(1)).join(',')).join(' ') }));
    }
    // Stops.
    (spec.stops || []).forEach((s, i) => {
      const [x, y] = px([s.lat, s.lon]);
      root.append(svg('g', { class: 'stop-marker' },
        svg('rect', { class: 'stop ' + (s.cls || ''), x: x - 9, y: y - 9, width: 18, height: 18, rx: 3 }),
        svg('text', { x: x, y: y + 4.5, 'text-anchor': 'middle', class: 'label', text: String(i + 1) }),
        s.label ? svg('text', { x: x + 14, y: y + 5, class: 'label', text: s.label }) : null));
    });
    // Vehicles.
    for (const v of spec.vehicles || []) {
      const [x, y] = px([v.lat, v.lon]);
      root.append(svg('g', { class: 'veh-marker' },
        svg('circle', { class: 'veh ' + (v.cls || ''), cx: x, cy: y, r: 9 }),
        v.label ? svg('text', { x: x + 13, y: y - 9, class: 'label', text: v.label }) : null));
    }
    // Scale bar and north.
    const bx = 16, by = H - 18;
    root.append(svg('g', { 'aria-hidden': 'true' },
      svg('path', { class: 'scale', d: `M${bx} ${by - 6}V${by}H${bx + barPx}V${by - 6}` }),
      svg('text', { class: 'scale-text', x: bx, y: by - 10, text: fmtMeters(bar) }),
      svg('text', { class: 'scale-text', x: W - 18, y: 22, 'text-anchor': 'middle', text: 'N' }),
      svg('path', { class: 'scale', d: `M${W - 18} 28v18M${W - 23} 34l5 -6l5 6` })));
    root.dataset.scaleM = String(bar);
    return root;
  }

  // The shipment view. `v`: a PortalShipment (portal) or a TrackingShipment (tracking
  // link, `tracking: true`); `track`: positions seen on this page, oldest first.
  const MILESTONE = {
    DISPATCHED: 'Dispatched', DEPARTED: 'On its way', ARRIVED: 'Arrived',
    DELIVERED: 'Delivered', DELIVERY_FAILED: 'Delivery attempt failed',
    POD_CONFIRMED: 'Proof of delivery confirmed', RETURNED: 'Returned to sender',
    CANCELLED: 'Cancelled', CLOSED: 'Completed', ETA: 'Expected',
  };
  const CLASSIFIER = { PLN: 'planned', EST: 'expected', ACT: '' };
  function statusClass(status) {
    const s = (status || '').toLowerCase();
    if (s.includes('fail') || s.includes('cancel') || s.includes('return')) return 'bad';
    if (s.includes('deliver') || s.includes('complet')) return 'ok';
    return '';
  }
  const TIMELINESS = { on_time: ['On time', 'ok'], at_risk: ['At risk', 'warn'], late: ['Late', 'bad'] };

  function shipmentView(v, opts) {
    const tracking = !!(opts && opts.tracking);
    const stops = tracking ? (v.stop ? [Object.assign({ kind: 'delivery' }, v.stop)] : []) : (v.stops || []);
    const stopName = (id) => { const s = (v.stops || []).find((x) => x.id === id); return s ? s.name : ''; };
    const next = tracking ? (v.stop && !v.stop.completed ? v.stop : null)
      : (v.next_stop ? Object.assign({}, (v.stops || []).find((s) => s.id === v.next_stop.id) || {}, v.next_stop) : null);
    const etaWindow = next && next.eta_window;
    const out = el('article', { class: 'shipment', 'data-rev': v.rev });

    const tl = TIMELINESS[v.timeliness];
    out.append(el('div', { class: 'card' },
      el('div', { class: 'row-head' },
        el('h1', { id: 'detail-title' }, (tracking ? 'Delivery ' : 'Shipment ') + v.reference),
        el('span', { id: 'status', class: 'badge ' + statusClass(v.status), text: v.status })),
      tl ? el('p', {}, el('span', { class: 'badge ' + tl[1], text: tl[0] })) : null,
      next ? el('section', { 'aria-labelledby': 'eta-title' },
        el('h2', { id: 'eta-title' }, 'Expected'),
        el('p', { id: 'eta', class: 'eta' }, etaWindow ? fmtWindow(etaWindow) : 'Not estimated yet'),
        el('p', { class: 'muted' }, 'at ' + (next.name || '') + (next.address ? ', ' + next.address : '')),
        next.window ? el('p', { class: 'muted' }, 'Agreed window: ' + fmtWindow(next.window)) : null) : null,
      !tracking && v.updated ? el('p', { class: 'muted' }, 'Updated ' + fmtTime(v.updated)) : null));

    const grid = el('div', { class: 'detail-grid' });
    // Map.
    const veh = v.vehicle;
    const mapStops = stops.filter((s) => s.location).map((s) => ({
      lat: s.location[0], lon: s.location[1], label: s.name,
      cls: s.completed ? 'done' : (next && (s.id === next.id || tracking) ? 'next' : ''),
    }));
    const track = ((opts && opts.track) || []).slice();
    if (veh) track.push([veh.lat, veh.lon]);
    let where;
    if (veh) {
      const target = mapStops.find((s) => s.cls === 'next');
      const d = target ? distM([veh.lat, veh.lon], [target.lat, target.lon]) : null;
      where = 'Last position ' + fmtTime(veh.time) + (d !== null ? ', ' + (d >= 1000 ? (d / 1000).toFixed(1) + ' km' : Math.round(d) + ' m') + ' from ' + target.label : '')
        + (veh.speed_mps ? ', ' + Math.round(veh.speed_mps * 3.6) + ' km/h' : '');
    } else {
      where = v.pod ? 'Delivered: the vehicle is no longer shown.' : 'The vehicle shows here while it is on its way to you.';
    }
    const mapLabel = 'Map of ' + (mapStops.length === 1 ? 'the delivery address' : mapStops.length + ' stops') + (veh ? ' and the vehicle' : '');
    grid.append(el('section', { class: 'card', 'aria-labelledby': 'map-title' },
      el('h2', { id: 'map-title' }, 'Where it is'),
      el('div', { id: 'map' }, drawMap({ stops: mapStops, vehicles: veh ? [{ lat: veh.lat, lon: veh.lon, label: 'Vehicle' }] : [], track: veh ? track : [], label: mapLabel })),
      el('p', { id: 'vehicle-pos', class: 'muted' }, where)));

    // Timeline.
    const items = (v.timeline || []).map((m) => {
      let what = MILESTONE[m.type] || m.type;
      if (!tracking && m.stop_id && (m.type === 'ARRIVED' || m.type === 'DEPARTED' || m.type === 'ETA')) {
        what = { ARRIVED: 'Arrived at ', DEPARTED: 'Left ', ETA: 'Expected at ' }[m.type] + (stopName(m.stop_id) || m.stop_id);
      }
      const kind = CLASSIFIER[m.classifier] ? ' (' + CLASSIFIER[m.classifier] + ')' : '';
      return el('li', { class: (m.classifier || '').toLowerCase() === 'act' ? 'act' : (m.classifier === 'EST' ? 'est' : 'pln') },
        el('span', {}, what + kind), el('span', { class: 'when' }, fmtTime(m.event_time)));
    });
    grid.append(el('section', { class: 'card', 'aria-labelledby': 'tl-title' },
      el('h2', { id: 'tl-title' }, 'Timeline'),
      items.length ? el('ol', { id: 'timeline', class: 'timeline' }, items) : el('p', { class: 'muted' }, 'Nothing yet.')));
    out.append(grid);

    // Proof of delivery.
    if (v.pod) out.append(podView(v.pod, tracking));

    // Stops (portal only).
    if (!tracking && stops.length > 1) {
      out.append(el('section', { class: 'card', 'aria-labelledby': 'stops-title' },
        el('h2', { id: 'stops-title' }, 'Stops'),
        el('ol', {}, stops.map((s) => el('li', {},
          el('strong', {}, s.name), ' ', el('span', { class: 'muted' }, (s.kind === 'pickup' ? 'pickup' : 'delivery') + (s.completed ? ', done' : '')),
          s.address ? el('div', { class: 'muted' }, s.address) : null)))));
    }
    return out;
  }

  const OUTCOME = { delivered: 'Delivered', refused: 'Refused', damaged: 'Delivered damaged', partial: 'Partly delivered' };
  function podView(p, tracking) {
    const sec = el('section', { id: 'pod', class: 'card pod', 'aria-labelledby': 'pod-title' },
      el('h2', { id: 'pod-title' }, 'Proof of delivery'));
    const dl = el('dl', { class: 'kv' },
      el('dt', {}, 'Outcome'), el('dd', {}, OUTCOME[p.outcome] || p.outcome),
      el('dt', {}, 'When'), el('dd', {}, fmtTime(p.time)));
    if (p.reason_code) dl.append(el('dt', {}, 'Reason'), el('dd', {}, p.reason_code));
    if (tracking) {
      dl.append(el('dt', {}, 'Evidence'), el('dd', {}, (p.signed ? 'signed' : 'not signed') + ', ' + p.photos + ' photo' + (p.photos === 1 ? '' : 's')));
    } else {
      dl.append(el('dt', {}, 'Received by'), el('dd', { id: 'pod-recipient' }, p.recipient),
        el('dt', {}, 'Status'), el('dd', {}, el('span', { id: 'pod-confirmed', class: 'badge ' + (p.confirmed ? 'ok' : 'warn'),
          text: p.confirmed ? 'Confirmed' : 'Being checked' })));
    }
    sec.append(dl);
    if (!tracking) {
      const figs = [];
      if (p.signature) figs.push(el('figure', {}, el('img', { class: 'pod-signature', src: p.signature.url, alt: 'Signature of ' + p.recipient }), el('figcaption', {}, 'Signature')));
      (p.photos || []).forEach((ph, i) => figs.push(el('figure', {}, el('img', { class: 'pod-photo', src: ph.url, alt: 'Delivery photo ' + (i + 1) }), el('figcaption', {}, 'Photo ' + (i + 1)))));
      if (figs.length) sec.append(el('div', { class: 'images' }, figs));
    }
    return sec;
  }

  function reportError(e) {
    // Shown to the person, not thrown again (the page keeps working).
    const box = $('page-error');
    if (box) { box.hidden = false; box.textContent = 'Something went wrong on this page: ' + (e && e.message ? e.message : e); }
  }

  return { el, svg, $, show, clear, fmtTime, fmtWindow, ago, tokenFor, setToken, api, stream, live,
    drawMap, distM, shipmentView, statusClass, reportError };
})();
