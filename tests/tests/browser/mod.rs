//! A real browser for the page tests (a module of each `browser_*.rs`, not of the
//! fixtures' library: thirtyfour's `impl Add<Key> for String` would change how `+` on
//! strings type-checks in every other test): headless Chromium driven through chromedriver
//! (WebDriver, with the `thirtyfour` client), one chromedriver per test on a free port.
//!
//! The driver comes from `FLEETSYNC_TEST_CHROMEDRIVER` (`.ci/browser-deps` sets it) or
//! `chromedriver` on the PATH. Without one: `None` and a note on stderr, so a developer
//! without Chromium can run the rest; in CI (`CI` set) a missing browser is a failure,
//! never a silent skip.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use thirtyfour::common::command::FormatRequestData;
use thirtyfour::common::requestdata::RequestData;
use thirtyfour::extensions::cdp::ChromeDevTools;
use thirtyfour::prelude::*;
use thirtyfour::{CapabilitiesHelper, ChromeCapabilities, ChromiumLikeCapabilities};

/// The two sizes every screenshot is taken at: a phone and a desktop (CSS pixels).
pub(crate) const PHONE: (u32, u32) = (360, 740);
/// See [`PHONE`].
pub(crate) const DESKTOP: (u32, u32) = (1280, 800);

/// The chromedriver to use, or `None` (outside CI only) when there is none.
pub(crate) fn chromedriver() -> Option<PathBuf> {
    let from_env = std::env::var_os("FLEETSYNC_TEST_CHROMEDRIVER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let found = from_env.or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chromedriver"))
                .find(|f| f.is_file())
        })
    });
    match found {
        Some(p) if p.is_file() => Some(p),
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "no chromedriver ({other:?}) in CI: .ci/run must source .ci/browser-deps"
            );
            eprintln!(
                "SKIPPED: no chromedriver (apt-get install chromium chromium-driver); browser tests not run"
            );
            None
        }
    }
}

/// Where screenshots go: `target/screenshots/` of the build running the test.
pub(crate) fn screenshot_dir() -> PathBuf {
    // target/<profile>/deps/<test> -> target
    let exe = std::env::current_exe().expect("the test knows its executable");
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).expect("target/screenshots can be made");
    dir
}

/// `POST /session/{id}/se/log {"type":"browser"}`: the browser console's entries since
/// the last call (chromedriver's logging endpoint).
#[derive(Debug)]
struct BrowserLog;

impl FormatRequestData for BrowserLog {
    fn format_request(&self, session_id: &thirtyfour::SessionId) -> RequestData {
        RequestData::new(
            reqwest::Method::POST,
            format!("/session/{session_id}/se/log"),
        )
        .add_body(json!({"type": "browser"}))
    }
}

/// A chromedriver process (its own process group, so Chromium goes with it) and one
/// browser session.
pub(crate) struct Browser {
    pub(crate) driver: WebDriver,
    driver_proc: Child,
    /// Console entries read so far (errors are asserted on at the end).
    pub(crate) console: Vec<Value>,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium at the desktop size.
    pub(crate) async fn start(chromedriver: &std::path::Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = fleetsync_tests::free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let base = format!("http://127.0.0.1:{port}");
        let ready = fleetsync_tests::wait_for(Duration::from_secs(20), || {
            let url = format!("{base}/status");
            async move {
                let v: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
                (v["value"]["ready"] == true).then_some(())
            }
        })
        .await;
        let mut b = Browser {
            // Filled below; a failed start still kills the process (Drop).
            driver: WebDriver::new(&base, Self::caps())
                .await
                .map_err(|e| {
                    assert!(ready.is_some(), "chromedriver did not become ready: {e}");
                    e
                })
                .expect("a Chromium session starts"),
            driver_proc: child,
            console: Vec::new(),
        };
        b.resize(DESKTOP).await;
        b.console.clear();
        b
    }

    fn caps() -> ChromeCapabilities {
        let mut caps = DesiredCapabilities::chrome();
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-color-profile=srgb",
            "--lang=en-GB",
        ] {
            caps.add_arg(arg).expect("a Chromium argument");
        }
        for bin in ["/usr/bin/chromium", "/usr/lib/chromium/chromium"] {
            if std::path::Path::new(bin).is_file() {
                caps.set_binary(bin).expect("the Chromium binary");
                break;
            }
        }
        caps.insert_base_capability("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        caps
    }

    /// Sets the viewport to `(w, h)` CSS pixels (a phone: touch and a mobile viewport).
    pub(crate) async fn resize(&mut self, (w, h): (u32, u32)) {
        let cdp = ChromeDevTools::new(self.driver.handle.clone());
        let mobile = w < 600;
        cdp.execute_cdp_with_params(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": w, "height": h, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await
        .expect("the viewport can be set");
    }

    /// Opens `url` (absolute).
    pub(crate) async fn goto(&mut self, url: &str) {
        self.driver.goto(url).await.expect("the page opens");
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub(crate) async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.driver
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
            .json()
            .clone()
    }

    /// The text of the first element matching `css` ("" if none).
    pub(crate) async fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
            vec![json!(css)],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Waits (`timeout` at most) until `check` (a script returning truthy) holds; panics
    /// with `what` and the page's text otherwise.
    pub(crate) async fn wait_js(&self, what: &str, timeout: Duration, check: &str) -> Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let v = self.js(check, vec![]).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            if std::time::Instant::now() > deadline {
                let body = self.text("body").await;
                panic!("{what}: not within {timeout:?}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element `css` exists and its text contains `want`.
    pub(crate) async fn wait_text(&self, css: &str, want: &str, timeout: Duration) {
        let check = format!(
            "const e = document.querySelector({}); return !!e && !e.closest('[hidden]') && e.innerText.includes({});",
            json!(css),
            json!(want)
        );
        self.wait_js(&format!("{css} showing {want:?}"), timeout, &check)
            .await;
    }

    /// Types `text` into the element `css` (focused by a click, as a person would).
    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let e = self.driver.find(By::Css(css)).await.expect("the field");
        e.click().await.expect("the field takes focus");
        e.send_keys(text).await.expect("typing");
    }

    /// Clicks the element `css`.
    pub(crate) async fn click(&self, css: &str) {
        self.driver
            .find(By::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Reads the browser console's new entries into [`Browser::console`].
    pub(crate) async fn read_console(&mut self) {
        let r = self
            .driver
            .handle
            .cmd(BrowserLog)
            .await
            .expect("browser log");
        if let Ok(Value::Array(entries)) = r.value_json() {
            self.console.extend(entries);
        }
    }

    /// Console entries at SEVERE level (errors, failed loads, CSP violations).
    pub(crate) async fn console_errors(&mut self) -> Vec<Value> {
        self.read_console().await;
        self.console
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .cloned()
            .collect()
    }

    /// Saves the page at the phone and the desktop size as
    /// `target/screenshots/{name}-phone.png` and `-desktop.png`, then goes back to the
    /// desktop size (the viewport as it is scrolled).
    pub(crate) async fn screenshots(&mut self, name: &str) {
        self.screenshots_at(name, None).await;
    }

    /// The same, scrolled to the element `css` first (at each size: a resize may lay the
    /// page out anew).
    pub(crate) async fn screenshots_at(&mut self, name: &str, css: Option<&str>) {
        let dir = screenshot_dir();
        for (label, size) in [("phone", PHONE), ("desktop", DESKTOP)] {
            self.resize(size).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Some(css) = css {
                self.js(
                    "const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView();",
                    vec![json!(css)],
                )
                .await;
            }
            let png = self.driver.screenshot_as_png().await.expect("a screenshot");
            let path = dir.join(format!("{name}-{label}.png"));
            std::fs::write(&path, png).expect("screenshot written");
        }
        self.resize(DESKTOP).await;
    }

    /// Ends the session and the driver.
    pub(crate) async fn quit(self) {
        let _ = self.driver.clone().quit().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole process group: chromedriver and the Chromium it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver_proc.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver_proc.kill();
        let _ = self.driver_proc.wait();
    }
}
