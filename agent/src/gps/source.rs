//! The `[gps] source` URL: which receiver to read and how.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where positions come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpsSource {
    /// gpsd's JSON protocol: `gpsd://HOST[:PORT]` (port 2947 when left out).
    Gpsd {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// NMEA 0183 from a serial device: `nmea+serial:///dev/ttyX?baud=9600`.
    NmeaSerial {
        /// Device path.
        path: PathBuf,
        /// Line speed (9600 when left out).
        baud: u32,
    },
    /// NMEA 0183 from a TCP socket: `nmea+tcp://HOST:PORT`.
    NmeaTcp {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A captured NMEA log, replayed: `nmea+file:///path?pace=realtime|max`.
    NmeaFile {
        /// The log.
        path: PathBuf,
        /// How fast to replay it (realtime when left out).
        pace: Pace,
    },
}

/// Replay speed of an `nmea+file` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// At the log's own pace, from the sentence times.
    Realtime,
    /// As fast as the consumer takes the fixes.
    Max,
}

/// gpsd's registered port.
pub const GPSD_DEFAULT_PORT: u16 = 2947;
/// Serial speed when `baud` is not given (NMEA 0183's standard rate).
pub const DEFAULT_BAUD: u32 = 9600;

/// Why a `[gps] source` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSourceError {
    /// No `scheme://`.
    #[error(
        "gps source {0:?}: expected SCHEME://..., one of gpsd://HOST:PORT, nmea+serial:///dev/ttyX?baud=9600, nmea+tcp://HOST:PORT, nmea+file:///path?pace=realtime|max"
    )]
    NoScheme(String),
    /// A scheme this agent does not read.
    #[error("gps source: unknown scheme {0:?}; expected gpsd, nmea+serial, nmea+tcp or nmea+file")]
    UnknownScheme(String),
    /// `gpsd://` or `nmea+tcp://` without a host.
    #[error("gps source {scheme}://: missing host (expected {scheme}://HOST:PORT)")]
    MissingHost {
        /// Scheme.
        scheme: &'static str,
    },
    /// `nmea+tcp://HOST` without a port.
    #[error("gps source {scheme}://{host}: missing port (expected {scheme}://HOST:PORT)")]
    MissingPort {
        /// Scheme.
        scheme: &'static str,
        /// Host.
        host: String,
    },
    /// The port is not a number in 1..=65535.
    #[error("gps source {scheme}://: port {port:?} is not a number in 1..=65535")]
    BadPort {
        /// Scheme.
        scheme: &'static str,
        /// What was given.
        port: String,
    },
    /// A path or query where the scheme takes none.
    #[error("gps source {scheme}://: unexpected {what:?} after HOST:PORT")]
    Trailing {
        /// Scheme.
        scheme: &'static str,
        /// The extra text.
        what: String,
    },
    /// `nmea+serial://` or `nmea+file://` without an absolute path.
    #[error("gps source {scheme}://: expected an absolute path ({scheme}:///path), got {got:?}")]
    MissingPath {
        /// Scheme.
        scheme: &'static str,
        /// What followed `scheme://`.
        got: String,
    },
    /// `baud=` is not a positive number.
    #[error("gps source nmea+serial: baud {0:?} is not a positive number (e.g. baud=9600)")]
    BadBaud(String),
    /// `pace=` is neither `realtime` nor `max`.
    #[error("gps source nmea+file: pace {0:?} is not one of realtime, max")]
    BadPace(String),
    /// A query parameter the scheme does not take.
    #[error("gps source {scheme}: unknown parameter {key:?} (accepted: {accepted})")]
    UnknownParameter {
        /// Scheme.
        scheme: &'static str,
        /// The parameter.
        key: String,
        /// What the scheme takes.
        accepted: &'static str,
    },
}

impl FromStr for GpsSource {
    type Err = ParseSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(ParseSourceError::NoScheme(s.to_owned()));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "gpsd" => {
                let (host, port) = host_port("gpsd", rest, Some(GPSD_DEFAULT_PORT))?;
                Ok(Self::Gpsd { host, port })
            }
            "nmea+tcp" => {
                let (host, port) = host_port("nmea+tcp", rest, None)?;
                Ok(Self::NmeaTcp { host, port })
            }
            "nmea+serial" => {
                let (path, query) = path_query("nmea+serial", rest)?;
                let mut baud = DEFAULT_BAUD;
                for (key, value) in query {
                    match key {
                        "baud" => {
                            baud = value
                                .parse::<u32>()
                                .ok()
                                .filter(|b| *b > 0)
                                .ok_or_else(|| ParseSourceError::BadBaud(value.to_owned()))?;
                        }
                        _ => {
                            return Err(ParseSourceError::UnknownParameter {
                                scheme: "nmea+serial",
                                key: key.to_owned(),
                                accepted: "baud",
                            });
                        }
                    }
                }
                Ok(Self::NmeaSerial { path, baud })
            }
            "nmea+file" => {
                let (path, query) = path_query("nmea+file", rest)?;
                let mut pace = Pace::Realtime;
                for (key, value) in query {
                    match key {
                        "pace" => {
                            pace = match value {
                                "realtime" => Pace::Realtime,
                                "max" => Pace::Max,
                                _ => return Err(ParseSourceError::BadPace(value.to_owned())),
                            }
                        }
                        _ => {
                            return Err(ParseSourceError::UnknownParameter {
                                scheme: "nmea+file",
                                key: key.to_owned(),
                                accepted: "pace",
                            });
                        }
                    }
                }
                Ok(Self::NmeaFile { path, pace })
            }
            _ => Err(ParseSourceError::UnknownScheme(scheme.to_owned())),
        }
    }
}

impl fmt::Display for GpsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host_fmt = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_owned()
            }
        };
        match self {
            Self::Gpsd { host, port } => write!(f, "gpsd://{}:{port}", host_fmt(host)),
            Self::NmeaTcp { host, port } => write!(f, "nmea+tcp://{}:{port}", host_fmt(host)),
            Self::NmeaSerial { path, baud } => {
                write!(f, "nmea+serial://{}?baud={baud}", path.display())
            }
            Self::NmeaFile { path, pace } => {
                let pace = match pace {
                    Pace::Realtime => "realtime",
                    Pace::Max => "max",
                };
                write!(f, "nmea+file://{}?pace={pace}", path.display())
            }
        }
    }
}

/// `HOST[:PORT]`, `[V6]:PORT`, with an optional trailing `/`.
fn host_port(
    scheme: &'static str,
    rest: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), ParseSourceError> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(i) = rest.find(['/', '?']) {
        return Err(ParseSourceError::Trailing {
            scheme,
            what: rest[i..].to_owned(),
        });
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(ParseSourceError::MissingHost { scheme });
        };
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => {
                return Err(ParseSourceError::Trailing {
                    scheme,
                    what: after.to_owned(),
                });
            }
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(ParseSourceError::MissingHost { scheme });
    }
    let port =
        match (port, default_port) {
            (Some(p), _) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                ParseSourceError::BadPort {
                    scheme,
                    port: p.to_owned(),
                }
            })?,
            (None, Some(d)) => d,
            (None, None) => {
                return Err(ParseSourceError::MissingPort {
                    scheme,
                    host: host.to_owned(),
                });
            }
        };
    Ok((host.to_owned(), port))
}

/// Query parameters as (key, value).
type Query<'a> = Vec<(&'a str, &'a str)>;

/// `/abs/path[?k=v&k=v]` (the `://` already removed, so a path starts with `/`).
fn path_query<'a>(
    scheme: &'static str,
    rest: &'a str,
) -> Result<(PathBuf, Query<'a>), ParseSourceError> {
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') || path.len() < 2 {
        return Err(ParseSourceError::MissingPath {
            scheme,
            got: rest.to_owned(),
        });
    }
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect();
    Ok((PathBuf::from(path), query))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(s: &str) -> Result<GpsSource, ParseSourceError> {
        s.parse()
    }

    #[test]
    fn parses_every_scheme() {
        assert_eq!(
            p("gpsd://127.0.0.1:2947").unwrap(),
            GpsSource::Gpsd {
                host: "127.0.0.1".into(),
                port: 2947
            }
        );
        assert_eq!(
            p("gpsd://gw.local").unwrap(),
            GpsSource::Gpsd {
                host: "gw.local".into(),
                port: GPSD_DEFAULT_PORT
            }
        );
        assert_eq!(
            p("gpsd://[::1]:3000/").unwrap(),
            GpsSource::Gpsd {
                host: "::1".into(),
                port: 3000
            }
        );
        assert_eq!(
            p("nmea+serial:///dev/ttyUSB0?baud=4800").unwrap(),
            GpsSource::NmeaSerial {
                path: "/dev/ttyUSB0".into(),
                baud: 4800
            }
        );
        assert_eq!(
            p("nmea+serial:///dev/ttyS1").unwrap(),
            GpsSource::NmeaSerial {
                path: "/dev/ttyS1".into(),
                baud: DEFAULT_BAUD
            }
        );
        assert_eq!(
            p("nmea+tcp://10.0.0.5:10110").unwrap(),
            GpsSource::NmeaTcp {
                host: "10.0.0.5".into(),
                port: 10110
            }
        );
        assert_eq!(
            p("nmea+file:///var/log/route.nmea?pace=max").unwrap(),
            GpsSource::NmeaFile {
                path: "/var/log/route.nmea".into(),
                pace: Pace::Max
            }
        );
        assert_eq!(
            p("nmea+file:///r.nmea").unwrap(),
            GpsSource::NmeaFile {
                path: "/r.nmea".into(),
                pace: Pace::Realtime
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "gpsd://[::1]:2947",
            "gpsd://h:1",
            "nmea+tcp://h:10110",
            "nmea+serial:///dev/ttyAMA0?baud=115200",
            "nmea+file:///a/b.log?pace=realtime",
            "nmea+file:///a/b.log?pace=max",
        ] {
            assert_eq!(p(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("/dev/ttyUSB0", "expected SCHEME://"),
            ("serial:///dev/ttyUSB0", "unknown scheme \"serial\""),
            ("gpsd://:2947", "missing host"),
            ("nmea+tcp://host", "missing port"),
            ("nmea+tcp://host:99999", "port \"99999\""),
            ("gpsd://host:0", "port \"0\""),
            ("gpsd://host:2947/x", "unexpected \"/x\""),
            ("nmea+serial://ttyUSB0", "absolute path"),
            ("nmea+serial:///dev/ttyUSB0?baud=fast", "baud \"fast\""),
            (
                "nmea+serial:///dev/ttyUSB0?speed=9600",
                "unknown parameter \"speed\"",
            ),
            ("nmea+file:///x.log?pace=slow", "pace \"slow\""),
            ("nmea+file:///x.log?rate=1", "unknown parameter \"rate\""),
        ];
        for (input, want) in cases {
            let msg = p(input).unwrap_err().to_string();
            assert!(msg.contains(want), "{input}: {msg:?} lacks {want:?}");
        }
    }
}
