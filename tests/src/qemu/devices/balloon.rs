//! virtio-balloon: `virtio-balloon-pci` (no `ioeventfd` property). The `balloon` scenario
//! attaches it itself with the run's properties and drives targets over QMP
//! (`balloon_host`); `boot` and `smoke` use [`attach`].

use super::{Attach, DeviceFiles, DeviceSpec, ScenarioSpec};
use crate::qemu::balloon_host;
use virtio_core::DeviceType;

pub const DEVICE: DeviceSpec = DeviceSpec {
    device_type: DeviceType::Balloon,
    attach,
    scenarios: &[ScenarioSpec {
        name: "balloon",
        devices: &[],
        trace: true,
        timeout_secs: 120,
        host: Some(balloon_host::start),
    }],
};

fn attach(ctx: &Attach<'_>, _: &mut DeviceFiles) -> std::io::Result<Vec<String>> {
    Ok(vec![
        "-device".into(),
        format!("virtio-balloon-pci,id=balloon0{}", ctx.props_no_ioeventfd),
    ])
}
