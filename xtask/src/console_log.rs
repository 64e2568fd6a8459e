//! The launchd pieces shipped with VirtioConsole.kext (`kexts/VirtioConsole/launchd/`):
//! the console log daemon (kernel log and the last panic report to `/dev/cu.virtio`, see
//! `console-log.sh`) and, optionally, a getty with a login prompt on a named port. Installed
//! and removed by `sudo cargo xtask install --console-log [--getty <port>]` /
//! `--remove-console-log`; their property lists are generated here and checked with a
//! plist parser.

use std::path::Path;

use crate::install::{Action, OnFail, Step, quote, run_step};

/// The script, in the tree and where it is installed.
pub const SCRIPT_SRC: &str = "kexts/VirtioConsole/launchd/console-log.sh";
pub const SCRIPT_DEST: &str = "/Library/Application Support/VirtioDarwin/console-log.sh";
/// The log daemon's property list, in the tree (generated, checked by `kexts --check`).
pub const LOG_PLIST_SRC: &str = "kexts/VirtioConsole/launchd/org.virtiodarwin.console-log.plist";
pub const LOG_LABEL: &str = "org.virtiodarwin.console-log";
pub const GETTY_LABEL: &str = "org.virtiodarwin.console-getty";
pub const DAEMONS: &str = "/Library/LaunchDaemons";
/// Where the daemon's own complaints go (its output is the console port).
pub const LOG_ERR: &str = "/var/log/virtio-console-log.log";
/// The script's state (the checksum of the last panic report sent, the boot it last ran in).
pub const STATE_DIR: &str = "/var/db/virtiodarwin";

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
/// 10 s) when it fails (the stream ended); not when it exits 0, which it does when the VM
/// has no console port (`KeepAlive` = `SuccessfulExit` false).
pub fn log_daemon_plist() -> String {
    let mut keep_alive = plist::Dictionary::new();
    keep_alive.insert("SuccessfulExit".into(), false.into());
    daemon(
        LOG_LABEL,
        &["/bin/sh", SCRIPT_DEST],
        &[
            ("KeepAlive", plist::Value::Dictionary(keep_alive)),
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
            "--getty {}: give the port's name as /dev/tty.<name> shows it (letters, \
             digits, '.', '_', '-'), e.g. --getty org.virtiodarwin.login",
            quote(port)
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

/// Where launchd finds job `label`.
pub fn plist_path(label: &str) -> String {
    format!("{DAEMONS}/{label}.plist")
}

/// The folder holding the script.
fn script_dir() -> String {
    Path::new(SCRIPT_DEST)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// `launchctl bootout system/<label>`: stops a job (and removes it from launchd) by its
/// label, whether or not its property list is still there; a job that is not loaded makes it
/// fail, which is not a problem anywhere, so the failure is ignored.
fn bootout(what: String, label: &str) -> Step {
    run_step(
        what,
        &["launchctl", "bootout", &format!("system/{label}")],
        OnFail::Ignore,
    )
}

/// Starts the job at `plist` now and at every boot: `launchctl enable` first (clears a
/// disabled override, which would make the bootstrap fail), then `launchctl bootstrap
/// system` (both launchd 2, macOS 10.10 and later). A failure is a warning.
fn start(what: &str, label: &str, plist: &str) -> [Step; 2] {
    [
        run_step(
            format!("{what}: enable it (at every boot)"),
            &["launchctl", "enable", &format!("system/{label}")],
            OnFail::Warn,
        ),
        run_step(
            format!("{what}: start it"),
            &["launchctl", "bootstrap", "system", plist],
            OnFail::Warn,
        ),
    ]
}

/// The install steps for the launchd pieces, in order: the job is stopped first (a re-run:
/// `launchctl bootout`, "not loaded" ignored), then the script and the plists are
/// installed, then the job is enabled and bootstrapped. The getty job likewise with
/// `getty`.
pub fn install_steps(root: &Path, getty: Option<&str>) -> Vec<Step> {
    let script = root.join(SCRIPT_SRC).display().to_string();
    let log_plist = root.join(LOG_PLIST_SRC).display().to_string();
    let log_dest = plist_path(LOG_LABEL);
    let getty_dest = plist_path(GETTY_LABEL);
    let mut steps = vec![bootout(
        "console log: stop the job (a re-run)".into(),
        LOG_LABEL,
    )];
    if getty.is_some() {
        steps.push(bootout(
            "login prompt: stop the job (a re-run)".into(),
            GETTY_LABEL,
        ));
    }
    steps.extend([
        run_step(
            "console log: its directory",
            &["mkdir", "-p", &script_dir()],
            OnFail::Stop,
        ),
        run_step(
            "console log: the script",
            &[
                "install",
                "-m",
                "0755",
                "-o",
                "root",
                "-g",
                "wheel",
                &script,
                SCRIPT_DEST,
            ],
            OnFail::Stop,
        ),
        run_step(
            "console log: the launchd job",
            &[
                "install", "-m", "0644", "-o", "root", "-g", "wheel", &log_plist, &log_dest,
            ],
            OnFail::Stop,
        ),
    ]);
    steps.extend(start("console log", LOG_LABEL, &log_dest));
    if let Some(port) = getty {
        let what = format!("login prompt on /dev/tty.{port}");
        steps.push(Step {
            what: format!("{what}: the launchd job"),
            action: Action::Write {
                path: getty_dest.clone(),
                contents: getty_plist(port),
                mode: 0o644,
            },
            on_fail: OnFail::Stop,
        });
        steps.extend(start(&what, GETTY_LABEL, &getty_dest));
    }
    steps
}

/// The removal steps, the same whatever is in place: for each job, `launchctl bootout`
/// ("not loaded" ignored), `launchctl list <label>` to check it is gone (a warning if it is
/// still loaded) and `rm -f` of its plist; then the script's folder, the daemon's state and
/// its log.
pub fn remove_steps() -> Vec<Step> {
    let mut steps = Vec::new();
    for label in [GETTY_LABEL, LOG_LABEL] {
        let plist = plist_path(label);
        steps.push(bootout(format!("stop {label}"), label));
        steps.push(run_step(
            format!("{label} is stopped (fails when it is)"),
            &["launchctl", "list", label],
            OnFail::JobGone,
        ));
        steps.push(run_step(
            format!("remove {label}"),
            &["rm", "-f", &plist],
            OnFail::Stop,
        ));
    }
    steps.push(run_step(
        "remove the console log script's folder",
        &["rm", "-rf", &script_dir()],
        OnFail::Stop,
    ));
    steps.push(run_step(
        "remove its state (the last panic report sent)",
        &["rm", "-rf", STATE_DIR],
        OnFail::Stop,
    ));
    steps.push(run_step(
        "remove its log",
        &["rm", "-f", LOG_ERR],
        OnFail::Stop,
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
        let keep = log["KeepAlive"]
            .as_dictionary()
            .expect("KeepAlive keyed on the exit");
        assert_eq!(keep["SuccessfulExit"].as_boolean(), Some(false));
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

    /// The script itself, run by `/bin/sh` with stand-ins for `sw_vers`, `log`, `syslog`,
    /// `sysctl` and `nvram`, a regular file as the port and a directory of panic reports: the
    /// newest report goes out once, then the kernel log stream, chosen by the macOS version;
    /// a report written after the start, while the script waits at its first start in a
    /// boot, goes out too; without a port it exits 0 (no restart); its log stays bounded.
    #[test]
    fn the_script_sends_the_last_panic_once_then_streams_the_kernel_log() {
        let root = crate::kexts::workspace_root().unwrap();
        let tmp = std::env::temp_dir().join(format!("virtio-console-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let bin = tmp.join("bin");
        let reports = tmp.join("reports");
        let state = tmp.join("state");
        let log_file = tmp.join("daemon.log");
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
        // kern.bootsessionuuid: $FAKE_UUID (empty: none, as on a kernel without it);
        // kern.boottime: $FAKE_BOOT.
        fake(
            "sysctl",
            "case \"$2\" in kern.bootsessionuuid) echo \"$FAKE_UUID\" ;; \\
             *) echo \"{ sec = $FAKE_BOOT, usec = 0 }\" ;; esac",
        );
        fake("nvram", "exit 1");
        std::fs::write(reports.join("Kernel-2026-01-01.panic"), "old panic\n").unwrap();
        // Older by mtime: written first, then the newer one a moment later.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(
            reports.join("Kernel-2026-02-02.panic"),
            "panic(cpu 0): boom\n",
        )
        .unwrap();
        // The real tools the script uses, on a PATH of their own: whether `log` is found
        // must not depend on the host (macOS has /usr/bin/log). A system without `log`
        // (PureDarwin, before 10.12) gets a PATH without the stand-in.
        let tools = tmp.join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        let host_path = std::env::var("PATH").unwrap();
        for t in [
            "cat", "cksum", "date", "ls", "mkdir", "rm", "sleep", "tail", "wc", "uname",
        ] {
            let found = std::env::split_paths(&host_path)
                .map(|d| d.join(t))
                .find(|p| p.is_file())
                .unwrap_or_else(|| panic!("no {t} on PATH"));
            std::os::unix::fs::symlink(found, tools.join(t)).unwrap();
        }
        let no_log = tmp.join("bin-no-log");
        std::fs::create_dir_all(&no_log).unwrap();
        for t in ["sw_vers", "syslog", "sysctl", "nvram"] {
            std::os::unix::fs::symlink(bin.join(t), no_log.join(t)).unwrap();
        }
        let port = tmp.join("port");
        let script = |boot: &str, version: &str| {
            let mut c = Command::new("/bin/sh");
            c.arg(root.join(SCRIPT_SRC))
                .env(
                    "PATH",
                    format!(
                        "{}:{}",
                        if version.is_empty() { &no_log } else { &bin }.display(),
                        tools.display()
                    ),
                )
                .env("FAKE_VERSION", version)
                .env("FAKE_UUID", if boot == "1000" { "" } else { "5E1F-UUID" })
                .env("FAKE_BOOT", boot)
                .env("VIRTIO_CONSOLE_PORT", &port)
                .env("VIRTIO_CONSOLE_STATE_DIR", &state)
                .env("VIRTIO_CONSOLE_PANIC_DIRS", &reports)
                .env("VIRTIO_CONSOLE_PANIC_SETTLE", "2")
                .env("VIRTIO_CONSOLE_PANIC_WAIT", "20")
                .env("VIRTIO_CONSOLE_BACKOFF_MAX", "0")
                .env("VIRTIO_CONSOLE_LOG_FILE", &log_file)
                .env("VIRTIO_CONSOLE_LOG_MAX", "2000");
            c
        };
        let run = |boot: &str, version: &str| {
            std::fs::write(&port, "").unwrap();
            let out = script(boot, version).output().unwrap();
            // The stream ended (the stand-in returns): exit 1, so launchd restarts it.
            assert_eq!(out.status.code(), Some(1));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("the kernel log stream ended"), "{err}");
            std::fs::read_to_string(&port).unwrap()
        };
        let first = run("1000", "13.6.1");
        assert!(first.contains("panic(cpu 0): boom"), "{first}");
        assert!(
            first.contains("kernel log of macOS 13.6.1 follows"),
            "{first}"
        );
        assert!(
            !first.contains("old panic"),
            "only the newest report: {first}"
        );
        assert!(
            first.ends_with("log stream --process kernel --style syslog --level info\n"),
            "{first}"
        );
        // The same boot again (no kern.bootsessionuuid: kern.boottime is the same): no wait,
        // and the report is not sent twice. No `log` on PATH (PureDarwin: no sw_vers
        // either): syslog.
        let t = std::time::Instant::now();
        let second = run("1000", "");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "no settle wait"
        );
        assert!(!second.contains("boom"), "sent once: {second}");
        assert!(second.ends_with("syslog -w -k Sender kernel\n"), "{second}");
        assert!(second.contains("kernel log of "), "{second}");
        assert!(
            !second.contains("kernel log of macOS"),
            "uname, not sw_vers: {second}"
        );
        // A new boot whose report is written a moment after the start: waited for, sent.
        std::fs::write(&port, "").unwrap();
        let child = script("2000", "13.6.1").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        std::fs::write(reports.join("Kernel-2026-03-03.panic"), "panic: late\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let third = std::fs::read_to_string(&port).unwrap();
        assert!(third.contains("panic: late"), "{third}");
        let saved = std::fs::read_to_string(state.join("boot")).unwrap();
        assert_eq!(
            saved.trim(),
            "5E1F-UUID",
            "the boot's UUID, when there is one"
        );
        // A missing port: the script gives up after the wait, with a reason, and exits 0
        // (launchd does not restart it); its log is trimmed past the bound.
        std::fs::write(&log_file, "x\n".repeat(2000)).unwrap();
        let out = Command::new("/bin/sh")
            .arg(root.join(SCRIPT_SRC))
            .env("VIRTIO_CONSOLE_PORT", tmp.join("absent"))
            .env("VIRTIO_CONSOLE_PORT_WAIT", "0")
            .env("VIRTIO_CONSOLE_LOG_FILE", &log_file)
            .env("VIRTIO_CONSOLE_LOG_MAX", "2000")
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("VirtioConsole.kext"));
        assert_eq!(
            std::fs::read_to_string(&log_file).unwrap().lines().count(),
            100
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }

    fn shown(steps: &[Step]) -> Vec<String> {
        steps.iter().map(|s| s.shown()).collect()
    }

    #[test]
    fn install_plan_stops_the_job_then_bootstraps_it() {
        let root = crate::kexts::workspace_root().unwrap();
        let log = plist_path(LOG_LABEL);
        let steps = install_steps(&root, None);
        let c = shown(&steps);
        // A re-run and a first install are the same plan: bootout, "not loaded" ignored.
        assert_eq!(c[0], format!("launchctl bootout system/{LOG_LABEL}"));
        assert_eq!(steps[0].on_fail, OnFail::Ignore);
        assert!(!c.iter().any(|c| c.contains(GETTY_LABEL)), "{c:#?}");
        assert!(
            !c.iter()
                .any(|c| c.contains("launchctl load") || c.contains("unload"))
        );
        let n = c.len();
        assert_eq!(
            c[n - 2..],
            [
                format!("launchctl enable system/{LOG_LABEL}"),
                format!("launchctl bootstrap system {log}"),
            ]
        );
        assert!(steps[n - 2..].iter().all(|s| s.on_fail == OnFail::Warn));
        assert!(
            c.iter()
                .position(|x| x.contains("install -m 0644"))
                .unwrap()
                < n - 2,
            "the plist is in place before it is bootstrapped"
        );
        let again = install_steps(&root, Some("org.virtiodarwin.login"));
        let c = shown(&again);
        assert_eq!(c[1], format!("launchctl bootout system/{GETTY_LABEL}"));
        assert_eq!(again[1].on_fail, OnFail::Ignore);
        let write = again
            .iter()
            .position(|s| matches!(s.action, Action::Write { .. }))
            .unwrap();
        assert_eq!(
            c[write + 1..],
            [
                format!("launchctl enable system/{GETTY_LABEL}"),
                format!("launchctl bootstrap system {}", plist_path(GETTY_LABEL)),
            ]
        );
        // Paths with a space are quoted: the plan pastes into a shell.
        assert!(c.contains(&"mkdir -p '/Library/Application Support/VirtioDarwin'".to_string()));
    }

    #[test]
    fn removal_is_the_same_whatever_is_in_place() {
        let steps = remove_steps();
        let c = shown(&steps);
        let mut want = Vec::new();
        for label in [GETTY_LABEL, LOG_LABEL] {
            want.push(format!("launchctl bootout system/{label}"));
            want.push(format!("launchctl list {label}"));
            want.push(format!("rm -f {}", plist_path(label)));
        }
        want.extend([
            "rm -rf '/Library/Application Support/VirtioDarwin'".to_string(),
            "rm -rf /var/db/virtiodarwin".to_string(),
            "rm -f /var/log/virtio-console-log.log".to_string(),
        ]);
        assert_eq!(c, want);
        // Not loaded is not a warning; still loaded after the bootout is.
        assert_eq!(steps[0].on_fail, OnFail::Ignore);
        assert_eq!(steps[1].on_fail, OnFail::JobGone);
        assert!(steps[2..].iter().all(|s| s.on_fail != OnFail::Warn));
    }

    #[test]
    fn getty_errors_are_shell_quoted() {
        let e = check_getty_port("it's").unwrap_err();
        assert!(e.starts_with(r"--getty 'it'\''s':"), "{e}");
        assert!(!e.contains('"'), "{e}");
    }
}
