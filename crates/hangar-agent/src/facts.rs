//! Guest facts sent with the hello.

use hangar_proto::GuestFacts;

pub fn gather() -> GuestFacts {
    let (kernel_release, hostname) = crate::sys::uname();
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64);
    GuestFacts {
        kernel_release,
        hostname,
        uptime_ms,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        addresses: Vec::new(),
    }
}
