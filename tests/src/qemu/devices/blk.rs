//! virtio-blk: a raw disk image of a known pattern ([`write_disk_image`]). The `blk`
//! scenarios attach the drive and device themselves (`blk_host`), configured by the run's
//! `blk_*` guest words; `boot` and `smoke` use [`attach`].

use super::{Attach, BLK_SERIAL, DeviceFiles, DeviceSpec, ScenarioSpec, write_disk_image};
use crate::qemu::blk_host;
use virtio_core::DeviceType;

pub const DEVICE: DeviceSpec = DeviceSpec {
    device_type: DeviceType::Block,
    attach,
    scenarios: &[
        ScenarioSpec {
            name: "blk",
            devices: &[],
            trace: true,
            timeout_secs: 180,
            host: Some(blk_host::start),
        },
        ScenarioSpec {
            name: "bench-blk",
            devices: &[],
            trace: true,
            timeout_secs: 180,
            host: Some(blk_host::start),
        },
        ScenarioSpec {
            name: "bench-blk-vd",
            devices: &[],
            trace: true,
            timeout_secs: 180,
            host: Some(blk_host::start),
        },
    ],
};

fn attach(ctx: &Attach<'_>, files: &mut DeviceFiles) -> std::io::Result<Vec<String>> {
    let disk = ctx.run_dir.join("disk.img");
    write_disk_image(&disk)?;
    let args = vec![
        "-drive".into(),
        format!("if=none,id=d0,format=raw,file={}", disk.display()),
        "-device".into(),
        format!("virtio-blk-pci,drive=d0,serial={BLK_SERIAL}{}", ctx.props),
    ];
    files.disk = Some(disk);
    Ok(args)
}
