// The tracking page of a link (/t/<token>): the reduced shipment view from
// /t/<token>/json, kept live by /t/<token>/stream. When the link expires the stream
// ends, the next read is a 404, and the page says the link no longer works.
'use strict';

(function () {
  const { $, clear } = FS;
  const base = location.pathname.replace(/\/+$/, '');
  const TRACK_MAX = 500;
  let view = null;
  let stream = null;
  const track = [];

  function gone() {
    view = null;
    if (stream) { stream.close(); stream = null; }
    clear($('shipment'));
    $('loading').hidden = true;
    $('gone').hidden = false;
    FS.live(false, 'Link expired');
  }

  function render() {
    if (!view) return;
    const box = $('shipment');
    clear(box);
    box.append(FS.shipmentView(view, { tracking: true, track }));
  }

  async function load() {
    const r = await FS.api(base + '/json');
    $('loading').hidden = true;
    if (r.status === 404) { gone(); return false; }
    if (r.status !== 200) {
      clear($('shipment'));
      $('shipment').append(FS.el('p', { class: 'error', role: 'alert' }, r.status === 429
        ? 'Too many requests from this link: wait ' + (r.retryAfter || 1) + ' s and reload.'
        : 'Could not load the delivery now (' + (r.error || r.status) + '). Try again shortly.'));
      return false;
    }
    if (!view || r.body.rev >= view.rev) view = r.body;
    render();
    return true;
  }

  let resized = null;
  window.addEventListener('resize', () => {
    clearTimeout(resized);
    resized = setTimeout(render, 150);
  });

  document.addEventListener('DOMContentLoaded', async () => {
    if (!(await load())) return;
    stream = FS.stream(base + '/stream', null, {
      onState: (on) => {
        FS.live(on);
        // The server ends the stream at the link's expiry: check whether it still works.
        if (!on) load();
      },
      onGone: gone,
      onEvent: (name, data) => {
        if (name === 'shipment') {
          if (view && data.rev < view.rev) return;
          view = data;
          render();
        } else if (name === 'position' && data.vehicle && view) {
          track.push([data.vehicle.lat, data.vehicle.lon]);
          if (track.length > TRACK_MAX) track.splice(0, track.length - TRACK_MAX);
          view.vehicle = data.vehicle;
          render();
        }
      },
    });
  });
})();
