// SPDX-License-Identifier: GPL-2.0

//! The boot side of persistent CBT: the configuration of `blksnapctl cbt
//! boot` and which devices one run of it handles.
//!
//! The file (by default `/etc/blksnap/cbt.conf`) has one directive a line:
//!
//! ```text
//! # comment
//! state /dev/disk/by-id/virtio-state       # the CBT state device (one)
//! state /dev/disk/by-id/A /dev/disk/by-id/B  # or: with a mirror on another disk
//! track /dev/disk/by-id/virtio-data        # tracked; the path is its id
//! track /dev/disk/by-id/nvme-...-part2 root  # an explicit id (1..63 bytes)
//! track /dev/disk/by-id/virtio-raw raw accept-missed-writes
//! ```
//!
//! `accept-missed-writes` at the end of a `track` line accepts that a
//! device without a file system to fingerprint gets its saved CBT back,
//! although nothing proves that nobody wrote to it while it was not
//! tracked (such writes would then be missing from the next incremental).
//! `#` starts a comment at the start of a line or after white space.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Where `blksnapctl cbt boot` reads its configuration.
pub const DEFAULT_CONFIG: &str = "/etc/blksnap/cbt.conf";

/// The words of a `track` line that accept a restore without a fingerprint.
pub const ACCEPT_MISSED_WRITES: &str = "accept-missed-writes";

/// A `track` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Track {
    /// The device path as written.
    pub path: PathBuf,
    /// The id its CBT state is saved under: the path as written, unless the
    /// line gives one.
    pub id: String,
    /// The line number, from 1.
    pub line: usize,
    /// The line ends with `accept-missed-writes`.
    pub accept_missed_writes: bool,
}

/// A parsed configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The state device, as written.
    pub state: Option<PathBuf>,
    /// Its mirror, as written.
    pub mirror: Option<PathBuf>,
    /// The tracked devices, in file order.
    pub track: Vec<Track>,
}

/// Cuts a comment: `#` at the start of the line or after white space.
fn strip_comment(line: &str) -> &str {
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_space {
            return &line[..i];
        }
        prev_space = c.is_whitespace();
    }
    line
}

fn absolute(n: usize, keyword: &str, path: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!(
            "line {n}: `{keyword}` needs an absolute path, not `{path}`"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Parses the text of a configuration file. Errors name the line.
pub fn parse(text: &str) -> Result<Config, String> {
    let mut config = Config::default();
    let mut state_line = 0;
    let mut ids = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let words: Vec<&str> = strip_comment(line).split_whitespace().collect();
        let Some((&keyword, args)) = words.split_first() else {
            continue;
        };
        match keyword {
            "state" => {
                let (path, mirror) = match args {
                    [path] => (path, None),
                    [path, mirror] => (path, Some(mirror)),
                    _ => return Err(format!("line {n}: expected `state PATH [MIRROR]`")),
                };
                if config.state.is_some() {
                    return Err(format!(
                        "line {n}: a second `state` line (the first is line {state_line}); there is one state device (and its mirror, on the same line)"
                    ));
                }
                config.state = Some(absolute(n, keyword, path)?);
                if let Some(m) = mirror {
                    let m = absolute(n, keyword, m)?;
                    if config.state.as_ref() == Some(&m) {
                        return Err(format!("line {n}: the mirror is the state device itself"));
                    }
                    config.mirror = Some(m);
                }
                state_line = n;
            }
            "track" => {
                let (args, accept) = match args.split_last() {
                    Some((&last, rest)) if last == ACCEPT_MISSED_WRITES => (rest, true),
                    _ => (args, false),
                };
                let (path, id) = match args {
                    [path] => (*path, *path),
                    [path, id] => (*path, *id),
                    _ => {
                        return Err(format!(
                            "line {n}: expected `track PATH [ID] [{ACCEPT_MISSED_WRITES}]`"
                        ))
                    }
                };
                let path = absolute(n, keyword, path)?;
                if crate::persist_id(id).is_err() {
                    return Err(format!(
                        "line {n}: the id `{id}` is {} bytes, at most 63 fit (give a shorter one: `track PATH ID`)",
                        id.len()
                    ));
                }
                if config.track.iter().any(|t| t.path == path) {
                    return Err(format!("line {n}: `{}` is tracked twice", path.display()));
                }
                if !ids.insert(id.to_string()) {
                    return Err(format!("line {n}: the id `{id}` is used twice"));
                }
                config.track.push(Track {
                    path,
                    id: id.to_string(),
                    line: n,
                    accept_missed_writes: accept,
                });
            }
            other => {
                return Err(format!(
                    "line {n}: unknown keyword `{other}` (expected `state` or `track`)"
                ))
            }
        }
    }
    if let Some(state) = &config.state {
        for s in std::iter::once(state).chain(config.mirror.as_ref()) {
            if let Some(t) = config.track.iter().find(|t| &t.path == s) {
                return Err(format!(
                    "line {}: `{}` is a state device, which is never tracked",
                    t.line,
                    s.display()
                ));
            }
        }
    } else if let Some(t) = config.track.first() {
        return Err(format!(
            "line {}: `track` without a `state` line: the CBT needs a state device",
            t.line
        ));
    }
    Ok(config)
}

/// Reads and parses the configuration at `path`; `None` if there is none.
pub fn load(path: &Path) -> Result<Option<Config>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The state device as one run of `cbt boot` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePath {
    /// As written in the configuration.
    pub path: PathBuf,
    /// The device it resolves to.
    pub resolved: PathBuf,
}

/// What one run of `cbt boot` does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// The state device to open; `None` if it is not there (yet).
    pub state: Option<StatePath>,
    /// Its mirror, to open after it; `None` if there is none or it is not
    /// there (yet: a state saved mirrored is then not restored).
    pub mirror: Option<StatePath>,
    /// A mirror is configured but not there.
    pub mirror_missing: bool,
    /// Whether to print the state device's line: a run for the whole
    /// configuration, or for the state device's own event.
    pub show_state: bool,
    /// Without `--device`, the configured state device is missing: an error.
    pub state_missing: bool,
    /// The tracked devices to attach (and to persist, if `state`), each
    /// with the device it resolves to.
    pub tracks: Vec<(&'a Track, PathBuf)>,
    /// Entries that cannot be used, with the reason.
    pub problems: Vec<String>,
}

impl Plan<'_> {
    /// Nothing to do: the run ends quietly.
    pub fn is_empty(&self) -> bool {
        self.tracks.is_empty()
            && !self.show_state
            && !self.state_missing
            && self.problems.is_empty()
    }
}

impl Config {
    /// Plans a run: for every existing `track` entry without `device`;
    /// with `device` (a device node from udev), for the entry that resolves
    /// to it, or for all of them if it is the state device. `resolve`
    /// gives the device a path leads to (`canonicalize`), `None` if it does
    /// not exist: such entries are skipped silently.
    pub fn plan(
        &self,
        device: Option<&Path>,
        resolve: impl Fn(&Path) -> Option<PathBuf>,
    ) -> Plan<'_> {
        let state = self.state.as_ref().and_then(|p| {
            resolve(p).map(|resolved| StatePath {
                path: p.clone(),
                resolved,
            })
        });
        let mirror = self.mirror.as_ref().and_then(|p| {
            resolve(p).map(|resolved| StatePath {
                path: p.clone(),
                resolved,
            })
        });
        let state_dev = state.as_ref().map(|s| s.resolved.clone());
        let mirror_dev = mirror.as_ref().map(|s| s.resolved.clone());
        let device = device.map(|d| resolve(d).unwrap_or_else(|| d.to_path_buf()));
        let is_state_event = device.is_some()
            && (device == state_dev || (mirror_dev.is_some() && device == mirror_dev));
        let mut tracks: Vec<(&Track, PathBuf)> = Vec::new();
        let mut problems = Vec::new();
        for t in &self.track {
            let Some(dev) = resolve(&t.path) else {
                continue;
            };
            let wanted = match &device {
                None => true,
                Some(d) => is_state_event || *d == dev,
            };
            if !wanted {
                continue;
            }
            if Some(&dev) == state_dev.as_ref() || Some(&dev) == mirror_dev.as_ref() {
                problems.push(format!(
                    "{} (line {}) is the state device {}, which is never tracked",
                    t.path.display(),
                    t.line,
                    dev.display()
                ));
            } else if let Some((other, _)) = tracks.iter().find(|(_, d)| *d == dev) {
                problems.push(format!(
                    "{} (line {}) is the same device as {} (line {})",
                    t.path.display(),
                    t.line,
                    other.path.display(),
                    other.line
                ));
            } else {
                tracks.push((t, dev));
            }
        }
        let show_state = state.is_some() && (device.is_none() || is_state_event);
        if device.is_some() && !is_state_event && tracks.is_empty() && problems.is_empty() {
            // Not a device of ours: nothing to do, not even the state device.
            return Plan::default();
        }
        Plan {
            mirror_missing: self.mirror.is_some() && mirror.is_none() && device.is_none(),
            mirror,
            state,
            show_state,
            state_missing: device.is_none() && self.state.is_some() && state_dev.is_none(),
            tracks,
            problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const EXAMPLE: &str = "\
# CBT across reboots
state /dev/disk/by-id/virtio-state   # 16 MiB is plenty

track /dev/disk/by-id/virtio-data
\ttrack   /dev/disk/by-id/virtio-data-part1#1 part1
track /dev/disk/by-id/virtio-gone
";

    #[test]
    fn parses_state_track_comments_and_ids() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.state, Some("/dev/disk/by-id/virtio-state".into()));
        let got: Vec<(&str, &str, usize)> = c
            .track
            .iter()
            .map(|t| (t.path.to_str().unwrap(), t.id.as_str(), t.line))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "/dev/disk/by-id/virtio-data",
                    "/dev/disk/by-id/virtio-data",
                    4
                ),
                ("/dev/disk/by-id/virtio-data-part1#1", "part1", 5),
                (
                    "/dev/disk/by-id/virtio-gone",
                    "/dev/disk/by-id/virtio-gone",
                    6
                ),
            ]
        );
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("# nothing\n\n   \n").unwrap(), Config::default());
        assert_eq!(
            parse("state /dev/vdh\n").unwrap(),
            Config {
                state: Some("/dev/vdh".into()),
                mirror: None,
                track: vec![]
            }
        );
    }

    #[test]
    fn errors_name_the_line() {
        for (text, want) in [
            (
                "state /dev/a\nfoo /dev/b\n",
                "line 2: unknown keyword `foo`",
            ),
            ("# c\nstate\n", "line 2: expected `state PATH [MIRROR]`"),
            (
                "state /dev/a\nstate /dev/b\n",
                "line 2: a second `state` line",
            ),
            (
                "state /dev/a\ntrack\n",
                "line 2: expected `track PATH [ID] [accept-missed-writes]`",
            ),
            (
                "state /dev/a\ntrack /dev/b x y\n",
                "line 2: expected `track PATH [ID] [accept-missed-writes]`",
            ),
            (
                "state /dev/a\ntrack /dev/b x accept-missed-writes y\n",
                "line 2: expected `track PATH [ID] [accept-missed-writes]`",
            ),
            (
                "state /dev/a /dev/b /dev/c\n",
                "line 1: expected `state PATH [MIRROR]`",
            ),
            (
                "state /dev/a /dev/a\n",
                "line 1: the mirror is the state device itself",
            ),
            (
                "state /dev/a /dev/m\ntrack /dev/m\n",
                "line 2: `/dev/m` is a state device",
            ),
            ("state dev/a\n", "line 1: `state` needs an absolute path"),
            (
                "state /dev/a\ntrack vdb\n",
                "line 2: `track` needs an absolute",
            ),
            (
                "state /dev/a\n\ntrack /dev/b\ntrack /dev/b id\n",
                "line 4: `/dev/b` is tracked twice",
            ),
            (
                "state /dev/a\ntrack /dev/b x\ntrack /dev/c x\n",
                "line 3: the id `x` is used twice",
            ),
            (
                "state /dev/a\ntrack /dev/c /dev/b\ntrack /dev/b\n",
                "line 3: the id `/dev/b` is used twice",
            ),
            (
                "track /dev/b\nstate /dev/b\n",
                "line 1: `/dev/b` is a state device",
            ),
            ("track /dev/b\n", "line 1: `track` without a `state` line"),
            ("STATE /dev/a\n", "line 1: unknown keyword `STATE`"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(want), "{text:?}: got `{e}`, want `{want}`");
        }
    }

    #[test]
    fn accept_missed_writes_and_mirror() {
        let c = parse(
            "state /dev/s /dev/m\ntrack /dev/b\ntrack /dev/c raw accept-missed-writes\ntrack /dev/d accept-missed-writes\n",
        )
        .unwrap();
        assert_eq!(c.state, Some("/dev/s".into()));
        assert_eq!(c.mirror, Some("/dev/m".into()));
        let got: Vec<(&str, &str, bool)> = c
            .track
            .iter()
            .map(|t| {
                (
                    t.path.to_str().unwrap(),
                    t.id.as_str(),
                    t.accept_missed_writes,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/dev/b", "/dev/b", false),
                ("/dev/c", "raw", true),
                ("/dev/d", "/dev/d", true)
            ]
        );
        // The mirror's own udev event plans like the state device's.
        let present = |p: &Path| Some(p.to_path_buf());
        let plan = c.plan(Some(Path::new("/dev/m")), present);
        assert!(plan.show_state);
        assert_eq!(plan.mirror.unwrap().resolved, Path::new("/dev/m"));
        assert_eq!(plan.tracks.len(), 3);
        let plan = c.plan(None, |p: &Path| {
            (p != Path::new("/dev/m")).then(|| p.to_path_buf())
        });
        assert!(plan.mirror_missing && plan.mirror.is_none());
    }

    #[test]
    fn ids_longer_than_63_bytes_are_refused() {
        let long = format!("/dev/disk/by-id/{}", "n".repeat(48));
        assert_eq!(long.len(), 64);
        let e = parse(&format!("state /dev/a\ntrack {long}\n")).unwrap_err();
        assert!(e.starts_with("line 2: the id"), "{e}");
        assert!(e.contains("64 bytes"), "{e}");
        let c = parse(&format!("state /dev/a\ntrack {long} data\n")).unwrap();
        assert_eq!(c.track[0].id, "data");
        assert_eq!(c.track[0].path, PathBuf::from(&long));
        let ok = &long[..63];
        assert_eq!(
            parse(&format!("state /dev/a\ntrack {ok}\n")).unwrap().track[0].id,
            ok
        );
    }

    #[test]
    fn load_without_a_file_is_none() {
        let p = std::env::temp_dir().join(format!("blksnap-cbt-{}-none.conf", std::process::id()));
        assert_eq!(load(&p).unwrap(), None);
        std::fs::write(&p, "state /dev/a\nbogus\n").unwrap();
        let e = load(&p).unwrap_err();
        assert!(e.ends_with("line 2: unknown keyword `bogus` (expected `state` or `track`)"));
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        std::fs::remove_file(&p).unwrap();
    }

    /// A fake `canonicalize`: the by-id links of the example, some devices
    /// present.
    fn resolver(present: &[&str]) -> impl Fn(&Path) -> Option<PathBuf> {
        let links: HashMap<&str, &str> = [
            ("/dev/disk/by-id/virtio-state", "/dev/vdh"),
            ("/dev/disk/by-id/virtio-data", "/dev/vdb"),
            ("/dev/disk/by-id/virtio-data-part1#1", "/dev/vdc1"),
            ("/dev/disk/by-id/virtio-gone", "/dev/vdz"),
        ]
        .into_iter()
        .collect();
        let present: Vec<String> = present.iter().map(|s| s.to_string()).collect();
        move |p: &Path| {
            let p = p.to_str().unwrap();
            let dev = links.get(p).copied().unwrap_or(p);
            present.iter().any(|d| d == dev).then(|| PathBuf::from(dev))
        }
    }

    fn paths(plan: &Plan<'_>) -> Vec<String> {
        plan.tracks
            .iter()
            .map(|(t, d)| format!("{}={}", t.id, d.display()))
            .collect()
    }

    #[test]
    fn plan_without_device_takes_every_existing_entry() {
        let c = parse(EXAMPLE).unwrap();
        let plan = c.plan(None, resolver(&["/dev/vdh", "/dev/vdb", "/dev/vdc1"]));
        assert_eq!(
            plan.state,
            Some(StatePath {
                path: "/dev/disk/by-id/virtio-state".into(),
                resolved: "/dev/vdh".into()
            })
        );
        assert!(plan.show_state && !plan.state_missing);
        assert_eq!(
            paths(&plan),
            ["/dev/disk/by-id/virtio-data=/dev/vdb", "part1=/dev/vdc1"]
        );
        assert!(plan.problems.is_empty());

        // The state device missing: the tracks are still attached.
        let plan = c.plan(None, resolver(&["/dev/vdb"]));
        assert_eq!(plan.state, None);
        assert!(plan.state_missing && !plan.show_state);
        assert_eq!(paths(&plan), ["/dev/disk/by-id/virtio-data=/dev/vdb"]);

        // Nothing there at all.
        let plan = c.plan(None, resolver(&[]));
        assert!(plan.tracks.is_empty() && plan.state_missing);
    }

    #[test]
    fn plan_with_device_takes_its_entry_only() {
        let c = parse(EXAMPLE).unwrap();
        let all = resolver(&["/dev/vdh", "/dev/vdb", "/dev/vdc1"]);
        let plan = c.plan(Some(Path::new("/dev/vdc1")), &all);
        assert_eq!(paths(&plan), ["part1=/dev/vdc1"]);
        assert_eq!(plan.state.as_ref().unwrap().resolved, Path::new("/dev/vdh"));
        assert!(!plan.show_state && !plan.state_missing);

        // By a link to it.
        let plan = c.plan(Some(Path::new("/dev/disk/by-id/virtio-data")), &all);
        assert_eq!(paths(&plan), ["/dev/disk/by-id/virtio-data=/dev/vdb"]);

        // Not ours: nothing, quietly.
        let plan = c.plan(Some(Path::new("/dev/vda")), resolver(&["/dev/vda"]));
        assert!(plan.is_empty(), "{plan:?}");
        assert_eq!(plan, Plan::default());

        // The state device's own event: every existing entry.
        let plan = c.plan(Some(Path::new("/dev/vdh")), &all);
        assert!(plan.show_state);
        assert_eq!(
            paths(&plan),
            ["/dev/disk/by-id/virtio-data=/dev/vdb", "part1=/dev/vdc1"]
        );

        // A tracked device before the state device: attach only, no error.
        let plan = c.plan(Some(Path::new("/dev/vdb")), resolver(&["/dev/vdb"]));
        assert_eq!(plan.state, None);
        assert!(!plan.state_missing && !plan.show_state);
        assert_eq!(paths(&plan), ["/dev/disk/by-id/virtio-data=/dev/vdb"]);
    }

    #[test]
    fn plan_refuses_the_state_device_and_duplicates() {
        let c = parse(
            "state /dev/disk/by-id/s\ntrack /dev/vdh\ntrack /dev/vdb\ntrack /dev/disk/by-id/b\n",
        )
        .unwrap();
        let resolve = |p: &Path| -> Option<PathBuf> {
            Some(PathBuf::from(match p.to_str().unwrap() {
                "/dev/disk/by-id/s" => "/dev/vdh",
                "/dev/disk/by-id/b" => "/dev/vdb",
                p => p,
            }))
        };
        let plan = c.plan(None, resolve);
        assert_eq!(paths(&plan), ["/dev/vdb=/dev/vdb"]);
        assert_eq!(plan.problems.len(), 2, "{:?}", plan.problems);
        assert!(plan.problems[0].contains("is the state device /dev/vdh"));
        assert!(plan.problems[1].contains("same device as /dev/vdb (line 3)"));
        // With --device, only the problems of that device.
        let plan = c.plan(Some(Path::new("/dev/vdb")), resolve);
        assert_eq!(paths(&plan), ["/dev/vdb=/dev/vdb"]);
        assert_eq!(plan.problems.len(), 1);
        let plan = c.plan(Some(Path::new("/dev/vdx")), resolve);
        assert!(plan.is_empty());
    }
}
