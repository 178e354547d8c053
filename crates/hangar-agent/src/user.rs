//! `docker exec -u` for the guest: resolve `user[:group]` against the
//! guest's /etc/passwd and /etc/group, then drop to it in the child.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Who a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
    pub name: Option<String>,
    pub home: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// Resolves `spec` (`name`, `uid`, `name:group`, `uid:gid`) with the
/// contents of /etc/passwd and /etc/group.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(format!(
            "user {spec:?} is not valid: give name, uid, name:group or uid:gid"
        ));
    }
    let users = parse_passwd(passwd);
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.into_iter().find(|u| u.uid == uid),
        Err(_) => Some(
            users
                .into_iter()
                .find(|u| u.name == user_part)
                .ok_or_else(|| {
                    format!("user {user_part} is not in the guest's /etc/passwd; give a numeric uid or add the user")
                })?,
        ),
    };
    let uid = match &entry {
        Some(entry) => entry.uid,
        None => user_part.parse::<u32>().unwrap_or(0),
    };
    let groups_table = parse_group(group);
    let gid = match group_part {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups_table
                .iter()
                .find(|(name, _, _)| name == group)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| {
                    format!("group {group} is not in the guest's /etc/group; give a numeric gid or add the group")
                })?,
        },
        // Like docker: a uid with no passwd entry runs with gid 0.
        None => entry.as_ref().map_or(0, |entry| entry.gid),
    };
    let mut groups = vec![gid];
    if let (Some(entry), None) = (&entry, group_part) {
        for (_, member_gid, members) in &groups_table {
            if members.iter().any(|m| m == &entry.name) && !groups.contains(member_gid) {
                groups.push(*member_gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|e| e.name.clone()),
        home: entry.map(|e| e.home),
    })
}

/// Reads the guest's files and resolves `spec`.
pub fn lookup(spec: &str) -> Result<Identity, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve(spec, &passwd, &group)
}

/// Makes `command` drop to `identity` in the child, before exec, and sets
/// HOME/USER/LOGNAME (the request's own env, applied later, wins).
pub fn apply(command: &mut Command, identity: &Identity) {
    if let Some(home) = &identity.home {
        command.env("HOME", home);
    }
    if let Some(name) = &identity.name {
        command.env("USER", name).env("LOGNAME", name);
    }
    let groups: Vec<libc::gid_t> = identity.groups.clone();
    let (uid, gid) = (identity.uid, identity.gid);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe syscalls on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: fields[0].to_owned(),
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
                home: fields[5].to_owned(),
            })
        })
        .collect()
}

/// (name, gid, members) per line of /etc/group.
fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() < 4 {
                return None;
            }
            let members = fields[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            Some((fields[0].to_owned(), fields[2].parse().ok()?, members))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        app:x:1000:1000:App:/home/app:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\n";

    #[test]
    fn names_and_numbers_resolve_like_docker() {
        let app = resolve("app", PASSWD, GROUP).unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.groups, vec![1000, 10]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        let numeric = resolve("1000", PASSWD, GROUP).unwrap();
        assert_eq!(numeric.name.as_deref(), Some("app"));
        let unknown = resolve("4242", PASSWD, GROUP).unwrap();
        assert_eq!((unknown.uid, unknown.gid, unknown.home), (4242, 0, None));
        let both = resolve("app:wheel", PASSWD, GROUP).unwrap();
        assert_eq!((both.gid, both.groups), (10, vec![10]));
        assert_eq!(resolve("5:7", PASSWD, GROUP).unwrap().gid, 7);
    }

    #[test]
    fn unknown_names_and_bad_specs_say_what_to_do() {
        let err = resolve("bob", PASSWD, GROUP).unwrap_err();
        assert!(
            err.contains("bob is not in the guest's /etc/passwd"),
            "{err}"
        );
        let err = resolve("app:staff", PASSWD, GROUP).unwrap_err();
        assert!(err.contains("group staff"), "{err}");
        assert!(resolve(":1", PASSWD, GROUP).is_err());
        assert!(resolve("app:", PASSWD, GROUP).is_err());
    }
}
