//! The launchd pieces shipped with VirtioConsole.kext (`kexts/VirtioConsole/launchd/`):
//! the console log daemon (kernel log and the last panic report to `/dev/cu.virtio`, see
//! `console-log.sh`) and, optionally, a getty with a login prompt on a named port. Installed
//! and removed by `sudo cargo xtask install --console-log [--getty <port>]` /
//! `--remove-console-log`; their property lists are generated here and checked with a
//! plist parser.

use std::path::Path;

/// The script, in the tree and where it is installed.
pub const SCRIPT_SRC: &str = "kexts/VirtioConsole/launchd/console-log.sh";
pub const SCRIPT_DEST: &str = "/Library/Application Support/VirtioDarwin/console-log.sh";
/// The log daemon's property list, in the tree (generated, checked by `kexts --check`).
pub const LOG_PLIST_SRC: &str = "kexts/VirtioConsole/launchd/org.virtiodarwin.console-log.plist";
pub const LOG_LABEL: &str = "org.virtiodarwin.console-log";
pub const GETTY_LABEL: &str = "org.virtiodarwin.console-getty";
pub const DAEMONS: &str = "/Library/LaunchDaemons";
/// Where the daemon's own complaints go (its output is the console port).
const LOG_ERR: &str = "/var/log/virtio-console-log.log";

fn xml(value: plist::Value) -> String {
    let mut out = Vec::new();
    // Writing a dictionary of strings, booleans and integers cannot fail.
    value
        .to_writer_xml(&mut out)
        .expect("a property list serialises");
    let mut s = String::from_utf8(out).expect("plist XML is UTF-8");
    s.push('\n');
    s
}

fn daemon(label: &str, program: &[&str], extra: &[(&str, plist::Value)]) -> String {
    let mut d = plist::Dictionary::new();
    d.insert("Label".into(), label.into());
    d.insert(
        "ProgramArguments".into(),
        plist::Value::Array(program.iter().map(|&a| a.into()).collect()),
    );
    d.insert("RunAtLoad".into(), true.into());
    d.insert("KeepAlive".into(), true.into());
    for (k, v) in extra {
        d.insert((*k).into(), v.clone());
    }
    xml(plist::Value::Dictionary(d))
}

/// `org.virtiodarwin.console-log.plist`: the script from boot, restarted (at most every
/// 10 s) when the stream ends.
pub fn log_daemon_plist() -> String {
    daemon(
        LOG_LABEL,
        &["/bin/sh", SCRIPT_DEST],
        &[
            ("ThrottleInterval", 10.into()),
            ("StandardErrorPath", LOG_ERR.into()),
        ],
    )
}

/// A login prompt on the console port named `port` (`/dev/tty.<port>`: the dial-in node,
/// so getty waits until the host side connects).
pub fn getty_plist(port: &str) -> String {
    let tty = format!("tty.{port}");
    daemon(
        GETTY_LABEL,
        &["/usr/libexec/getty", "std.9600", &tty],
        &[("ThrottleInterval", 10.into())],
    )
}

/// A port name as `--getty` takes it: what VirtioConsole.kext publishes (letters, digits,
/// `.`, `_`, `-`), and not port 0, which carries the kernel log.
pub fn check_getty_port(port: &str) -> Result<(), String> {
    if port.is_empty()
        || !port
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "--getty {port:?}: give the port's name as /dev/tty.<name> shows it (letters, \
             digits, '.', '_', '-'), e.g. --getty org.virtiodarwin.login"
        ));
    }
    if port == "virtio" {
        return Err(
            "--getty virtio: port 0 carries the kernel log; add a named port for the login \
             prompt (QEMU: -device virtserialport,name=org.virtiodarwin.login,...)"
                .into(),
        );
    }
    Ok(())
}

/// The install steps for the launchd pieces (commands, in order): the script, the plists,
/// then `launchctl load -w` (works on every macOS the kexts support).
pub fn install_steps(root: &Path, getty: Option<&str>) -> Vec<(String, Vec<String>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let script = root.join(SCRIPT_SRC).display().to_string();
    let log_plist = root.join(LOG_PLIST_SRC).display().to_string();
    let log_dest = format!("{DAEMONS}/{LOG_LABEL}.plist");
    let dir = Path::new(SCRIPT_DEST)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let mut steps = vec![
        (
            "console log: its directory".into(),
            s(&["mkdir", "-p", &dir]),
        ),
        (
            "console log: the script".into(),
            s(&[
                "install",
                "-m",
                "0755",
                "-o",
                "root",
                "-g",
                "wheel",
                &script,
                SCRIPT_DEST,
            ]),
        ),
        (
            "console log: the launchd job".into(),
            s(&[
                "install", "-m", "0644", "-o", "root", "-g", "wheel", &log_plist, &log_dest,
            ]),
        ),
        (
            "console log: start it (and at every boot)".into(),
            s(&["launchctl", "load", "-w", &log_dest]),
        ),
    ];
    if let Some(port) = getty {
        let dest = format!("{DAEMONS}/{GETTY_LABEL}.plist");
        // Written from the generated text by the installer (`write_getty_plist`), then
        // loaded.
        steps.push((
            format!("login prompt on /dev/tty.{port}: the launchd job"),
            s(&["write-file", &dest]),
        ));
        steps.push((
            format!("login prompt on /dev/tty.{port}: start it"),
            s(&["launchctl", "load", "-w", &dest]),
        ));
    }
    steps
}

/// The removal steps: unload and delete whatever `install_steps` put in place (a missing
/// piece is not an error: `rm -f`, and `launchctl unload` of an absent job only warns).
pub fn remove_steps() -> Vec<(String, Vec<String>)> {
    let mut steps = Vec::new();
    for label in [GETTY_LABEL, LOG_LABEL] {
        let plist = format!("{DAEMONS}/{label}.plist");
        steps.push((
            format!("stop {label}"),
            vec![
                "launchctl".into(),
                "unload".into(),
                "-w".into(),
                plist.clone(),
            ],
        ));
        steps.push((
            format!("remove {label}"),
            vec!["rm".into(), "-f".into(), plist],
        ));
    }
    steps.push((
        "remove the console log script".into(),
        vec!["rm".into(), "-f".into(), SCRIPT_DEST.into()],
    ));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn parse(xml: &str) -> plist::Dictionary {
        plist::Value::from_reader_xml(xml.as_bytes())
            .expect("parses as a property list")
            .into_dictionary()
            .expect("a dictionary")
    }

    #[test]
    fn the_plists_parse_and_say_what_launchd_needs() {
        let log = parse(&log_daemon_plist());
        assert_eq!(log["Label"].as_string(), Some(LOG_LABEL));
        let args: Vec<_> = log["ProgramArguments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_string().unwrap())
            .collect();
        assert_eq!(args, ["/bin/sh", SCRIPT_DEST]);
        assert_eq!(log["RunAtLoad"].as_boolean(), Some(true));
        assert_eq!(log["KeepAlive"].as_boolean(), Some(true));
        let getty = parse(&getty_plist("org.virtiodarwin.login"));
        assert_eq!(getty["Label"].as_string(), Some(GETTY_LABEL));
        assert_eq!(
            getty["ProgramArguments"].as_array().unwrap()[2].as_string(),
            Some("tty.org.virtiodarwin.login")
        );
        // The checked-in copy is the generated one (`cargo xtask kexts --check` too).
        let root = crate::kexts::workspace_root().unwrap();
        let on_disk = std::fs::read_to_string(root.join(LOG_PLIST_SRC)).unwrap();
        assert_eq!(on_disk, log_daemon_plist());
    }

    #[test]
    fn getty_ports_are_checked() {
        assert!(check_getty_port("org.virtiodarwin.login").is_ok());
        assert!(check_getty_port("virtio3").is_ok());
        assert!(check_getty_port("virtio").is_err());
        assert!(check_getty_port("").is_err());
        assert!(check_getty_port("a/b").is_err());
        let e = check_getty_port("bad name").unwrap_err();
        assert!(e.contains("--getty"), "{e}");
    }

    /// The script itself, run by `/bin/sh` with stand-ins for `sw_vers`, `log` and
    /// `syslog`, a regular file as the port and a directory of panic reports: the newest
    /// report goes out once, then the kernel log stream, chosen by the macOS version.
    #[test]
    fn the_script_sends_the_last_panic_once_then_streams_the_kernel_log() {
        let root = crate::kexts::workspace_root().unwrap();
        let tmp = std::env::temp_dir().join(format!("virtio-console-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let bin = tmp.join("bin");
        let reports = tmp.join("reports");
        let state = tmp.join("state");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&reports).unwrap();
        let fake = |name: &str, body: &str| {
            let p = bin.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            Command::new("chmod").arg("+x").arg(&p).status().unwrap();
        };
        fake("sw_vers", "echo \"$FAKE_VERSION\"");
        fake("log", "echo \"log $*\"");
        fake("syslog", "echo \"syslog $*\"");
        std::fs::write(reports.join("Kernel-2026-01-01.panic"), "old panic\n").unwrap();
        // Older by mtime: written first, then the newer one a moment later.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(
            reports.join("Kernel-2026-02-02.panic"),
            "panic(cpu 0): boom\n",
        )
        .unwrap();
        let port = tmp.join("port");
        let run = |version: &str| {
            std::fs::write(&port, "").unwrap();
            let out = Command::new("/bin/sh")
                .arg(root.join(SCRIPT_SRC))
                .env(
                    "PATH",
                    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
                )
                .env("FAKE_VERSION", version)
                .env("VIRTIO_CONSOLE_PORT", &port)
                .env("VIRTIO_CONSOLE_STATE_DIR", &state)
                .env("VIRTIO_CONSOLE_PANIC_DIRS", &reports)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::read_to_string(&port).unwrap()
        };
        let first = run("13.6.1");
        assert!(first.contains("panic(cpu 0): boom"), "{first}");
        assert!(
            !first.contains("old panic"),
            "only the newest report: {first}"
        );
        assert!(
            first.ends_with("log stream --process kernel --style syslog --level info\n"),
            "{first}"
        );
        let second = run("10.11.6");
        assert!(!second.contains("boom"), "sent once: {second}");
        assert!(second.ends_with("syslog -w -k Sender kernel\n"), "{second}");
        // A missing port: the script gives up after the wait, with a reason.
        let out = Command::new("/bin/sh")
            .arg(root.join(SCRIPT_SRC))
            .env("VIRTIO_CONSOLE_PORT", tmp.join("absent"))
            .env("VIRTIO_CONSOLE_PORT_WAIT", "0")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("VirtioConsole.kext"));
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn install_and_remove_plans() {
        let root = crate::kexts::workspace_root().unwrap();
        let steps = install_steps(&root, Some("org.virtiodarwin.login"));
        let cmds: Vec<String> = steps.iter().map(|(_, c)| c.join(" ")).collect();
        assert!(
            cmds.iter()
                .any(|c| c.starts_with("launchctl load -w") && c.contains(LOG_LABEL))
        );
        assert!(cmds.iter().any(|c| c.contains(GETTY_LABEL)));
        let rm: Vec<String> = remove_steps().iter().map(|(_, c)| c.join(" ")).collect();
        assert!(
            rm.iter()
                .any(|c| c.contains("unload") && c.contains(LOG_LABEL))
        );
        assert!(rm.iter().any(|c| c.contains(SCRIPT_DEST)));
    }
}
