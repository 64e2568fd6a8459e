//! The PVH command line (`-append`): `scenario=<name> irq=msix|intx|poll log=<level>
//! key=value ...`. Bare words are accepted as `word=` (empty value).

use alloc::string::{String, ToString};
use alloc::vec::Vec;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IrqMode {
    MsiX,
    Intx,
    Poll,
}

impl IrqMode {
    pub fn name(self) -> &'static str {
        match self {
            IrqMode::MsiX => "msix",
            IrqMode::Intx => "intx",
            IrqMode::Poll => "poll",
        }
    }
}

#[derive(Debug)]
pub struct Cmdline {
    pub scenario: String,
    pub irq: IrqMode,
    pub args: Vec<(String, String)>,
}

impl Cmdline {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut args: Vec<(String, String)> = Vec::new();
        for word in s.split_ascii_whitespace() {
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            args.push((k.to_string(), v.to_string()));
        }
        let get = |k: &str| {
            args.iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let scenario = get("scenario").unwrap_or("boot").to_string();
        let irq = match get("irq").unwrap_or("msix") {
            "msix" => IrqMode::MsiX,
            "intx" => IrqMode::Intx,
            "poll" => IrqMode::Poll,
            other => return Err(alloc::format!("irq={other}: expected msix, intx or poll")),
        };
        Ok(Self {
            scenario,
            irq,
            args,
        })
    }

    /// Last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `key` parsed as a number (for scenario parameters such as sizes and counts), (decimal or 0x-hex), or `default`.
    #[allow(dead_code)] // API for the device scenarios
    pub fn get_u64(&self, key: &str, default: u64) -> u64 {
        self.get(key)
            .and_then(|v| match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            })
            .unwrap_or(default)
    }
}
