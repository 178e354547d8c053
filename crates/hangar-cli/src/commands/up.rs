//! `up` and `down`.

use super::open;
use crate::cli::{Global, UpArgs};
use crate::output::{print_json, StdioSink};

pub fn up(global: &Global, args: UpArgs) -> anyhow::Result<u8> {
    let file = hangar::up_file::read_up_file(&args.file)?;
    let mut manager = open(global)?;
    super::note_accelerator(&mut manager, global)?;
    let changes = manager.up(&file, &mut StdioSink)?;
    if global.json {
        print_json(&changes)?;
    } else {
        for change in &changes {
            let action = serde_json::to_value(change.action)?;
            println!("{}: {}", change.name, action.as_str().unwrap_or_default());
        }
    }
    Ok(0)
}

pub fn down(global: &Global, args: UpArgs) -> anyhow::Result<u8> {
    let file = hangar::up_file::read_up_file(&args.file)?;
    let removed = open(global)?.down(&file.namespace)?;
    if global.json {
        print_json(&removed)?;
    } else {
        for name in &removed {
            println!("{name}: removed");
        }
    }
    Ok(0)
}
