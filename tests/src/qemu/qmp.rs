//! A small QMP client (QEMU Machine Protocol, `-qmp unix:PATH,server=on,wait=off`):
//! connect, negotiate capabilities, run commands (`set_link`, `query-status`, ...).
//! Events arriving between replies are kept in [`Qmp::events`].

use serde_json::{Value, json};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received so far (`{"event": ..., ...}`).
    pub events: Vec<Value>,
    /// QEMU's version from the greeting, e.g. `7.2.0`.
    pub version: String,
}

fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

impl Qmp {
    /// Connects to the socket at `path` (retrying until it exists, up to `timeout`), reads
    /// the greeting and enters command mode (`qmp_capabilities`). Each reply must arrive
    /// within `timeout` too.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(err(format!("QMP {}: {e}", path.display()))),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
            version: String::new(),
        };
        let greeting = q.read_message()?;
        let v = greeting
            .get("QMP")
            .ok_or_else(|| err(format!("QMP: unexpected greeting {greeting}")))?;
        let n = &v["version"]["qemu"];
        q.version = format!("{}.{}.{}", n["major"], n["minor"], n["micro"]);
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(err("QMP: connection closed"));
        }
        serde_json::from_str(&line).map_err(|e| err(format!("QMP: bad JSON {line:?}: {e}")))
    }

    /// Runs `command` with `arguments`; returns its `return` value, or the QMP error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push(m);
            } else if let Some(r) = m.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = m.get("error") {
                return Err(err(format!(
                    "QMP {command}: {} {}",
                    e["class"].as_str().unwrap_or("?"),
                    e["desc"].as_str().unwrap_or("?")
                )));
            } else {
                return Err(err(format!("QMP {command}: unexpected reply {m}")));
            }
        }
    }

    /// `set_link name=<id> up=<up>`: `id` is a NIC's `id=` or a netdev's id.
    pub fn set_link(&mut self, name: &str, up: bool) -> io::Result<()> {
        self.execute("set_link", Some(json!({ "name": name, "up": up })))
            .map(|_| ())
    }

    /// `query-rx-filter name=<id>`: the receive filter of NIC `id` as the device holds it
    /// (promiscuous, multicast mode, MAC and VLAN tables, `main-mac`).
    pub fn query_rx_filter(&mut self, name: &str) -> io::Result<Value> {
        let r = self.execute("query-rx-filter", Some(json!({ "name": name })))?;
        r.as_array()
            .and_then(|a| a.first())
            .cloned()
            .ok_or_else(|| err(format!("query-rx-filter: {r}")))
    }

    /// `query-status`: the run state (`running`, `paused`, ...).
    pub fn query_status(&mut self) -> io::Result<String> {
        let r = self.execute("query-status", None)?;
        r["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| err(format!("query-status: {r}")))
    }
}
