//! Reading Server-Sent Events as a browser's `EventSource` does, for the simulator's
//! stream clients: the load's portal clients and the chaos run's portal watcher.

/// One event of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// Its `event:` name (`message` when it has none).
    pub name: String,
    /// Its `id:`, if it has one.
    pub id: Option<String>,
    /// Its `data:` lines, joined with `\n`.
    pub data: String,
}

/// Takes every whole event (a block ended by a blank line) off the front of `buf`, in
/// order; what follows the last blank line stays for the next chunk. Comments (the hub's
/// heartbeats) and blocks without data are no event, as for `EventSource`.
pub fn take_events(buf: &mut Vec<u8>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(end) = block_end(buf) {
        let block: Vec<u8> = buf.drain(..end).collect();
        let text = String::from_utf8_lossy(&block);
        let mut ev = Event::default();
        let mut data: Option<String> = None;
        for line in text.lines() {
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => ev.name = value.to_string(),
                "id" => ev.id = Some(value.to_string()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                _ => {}
            }
        }
        if let Some(d) = data {
            if ev.name.is_empty() {
                ev.name = "message".into();
            }
            ev.data = d;
            out.push(ev);
        }
    }
    out
}

/// Where the first block ends, its blank line included (`\n\n` or `\r\n\r\n`).
fn block_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_and_heartbeats_skipped() {
        let mut buf =
            b": heartbeat\n\nevent: shipment\nid: 17-S1\ndata: {\"a\":1}\n\nevent: posi".to_vec();
        let evs = take_events(&mut buf);
        assert_eq!(
            evs,
            vec![Event {
                name: "shipment".into(),
                id: Some("17-S1".into()),
                data: "{\"a\":1}".into()
            }]
        );
        assert_eq!(buf, b"event: posi");
        buf.extend_from_slice(b"tion\r\ndata: x\r\ndata:y\r\n\r\n");
        let evs = take_events(&mut buf);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].name, "position");
        assert_eq!(evs[0].id, None);
        assert_eq!(evs[0].data, "x\ny");
        assert!(buf.is_empty());
    }
}
