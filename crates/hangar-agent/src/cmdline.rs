//! `hangar.*` options passed on the kernel command line.

/// The kernel command line, split into words.
#[derive(Debug, Default)]
pub struct KernelCmdline {
    words: Vec<String>,
}

impl KernelCmdline {
    pub fn read() -> Self {
        // /proc may not be mounted yet; init re-reads after mounting.
        let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Self {
        Self {
            words: text.split_whitespace().map(str::to_owned).collect(),
        }
    }

    /// The value of `key=value`, the last one winning like the kernel's.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.words
            .iter()
            .rev()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
    }

    /// True for a bare `key` or `key=1`.
    pub fn flag(&self, key: &str) -> bool {
        self.words.iter().any(|word| word == key) || self.value(key) == Some("1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_flags() {
        let cmdline = KernelCmdline::parse(
            "console=ttyS0 hangar.hostname=a hangar.probe hangar.hostname=web\n",
        );
        assert_eq!(cmdline.value("hangar.hostname"), Some("web"));
        assert_eq!(cmdline.value("console"), Some("ttyS0"));
        assert!(cmdline.flag("hangar.probe"));
        assert!(!cmdline.flag("hangar.other"));
        assert_eq!(cmdline.value("hangar.host"), None, "prefixes do not match");
    }
}
