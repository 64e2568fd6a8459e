//! virtio-console: `virtio-serial-pci` with 31 ports and a `virtconsole` on port 0 whose
//! chardev is a file the report reads; the `console` scenario adds named ports with a
//! host peer (`console_host`).

use super::{Attach, DeviceFiles, DeviceSpec, ScenarioSpec};
use crate::qemu::console_host;
use virtio_core::DeviceType;

pub const DEVICE: DeviceSpec = DeviceSpec {
    device_type: DeviceType::Console,
    attach,
    scenarios: &[ScenarioSpec {
        name: "console",
        devices: &[DeviceType::Console],
        trace: true,
        timeout_secs: 120,
        host: Some(console_host::start),
    }],
};

fn attach(ctx: &Attach<'_>, files: &mut DeviceFiles) -> std::io::Result<Vec<String>> {
    let out = ctx.run_dir.join("console.out");
    let args = vec![
        "-chardev".into(),
        format!("file,id=c0,path={}", out.display()),
        "-device".into(),
        format!("virtio-serial-pci,id=vser0,max_ports=31{}", ctx.props),
        "-device".into(),
        "virtconsole,chardev=c0,bus=vser0.0,nr=0".into(),
    ];
    files.console = Some(out);
    Ok(args)
}
