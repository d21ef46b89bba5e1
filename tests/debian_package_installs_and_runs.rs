//! The Debian package an operator installs (`scripts/package.sh`, run by
//! scripts/test.sh): its contents (`dpkg-deb`), its control data (dependencies,
//! conffiles, maintainer scripts), its systemd unit (`systemd-analyze verify`, and
//! the hardening it promises), and the binary it ships started from a scratch root
//! with the packaged config, taking an event.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn package() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let newest = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .max_by_key(|path| std::fs::metadata(path).unwrap().modified().unwrap());
    newest.unwrap_or_else(|| {
        panic!(
            "no package in {}: run scripts/package.sh (scripts/test.sh does)",
            dir.display()
        )
    })
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (dpkg-deb and systemd-analyze are needed)"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The package unpacked into `root` (`dpkg-deb -x`), with its control files in
/// `root/DEBIAN`.
fn unpack(root: &Path) {
    run(Command::new("dpkg-deb").arg("-x").arg(package()).arg(root));
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(package())
        .arg(root.join("DEBIAN")));
}

#[test]
fn the_package_holds_the_binary_unit_config_and_examples() {
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(package()));
    for path in [
        "usr/bin/breakwater",
        "lib/systemd/system/breakwater.service",
        "etc/breakwater/breakwater.toml",
        "usr/share/breakwater/policies/default.toml",
        "usr/share/doc/breakwater/examples/breakwater.example.toml",
        "usr/share/doc/breakwater/examples/breakwater.backends.example.toml",
    ] {
        assert!(listing.contains(path), "{path} not in the package:\n{listing}");
    }
    let fields = run(Command::new("dpkg-deb").arg("-f").arg(package()));
    assert!(fields.contains("Package: breakwater"), "{fields}");
    assert!(fields.contains("adduser"), "depends on adduser (postinst): {fields}");

    let root = tempfile::tempdir().unwrap();
    unpack(root.path());
    let conffiles = std::fs::read_to_string(root.path().join("DEBIAN/conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|line| line == "/etc/breakwater/breakwater.toml"),
        "the config is a conffile (an upgrade keeps the operator's edits): {conffiles}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh")
            .arg("-n")
            .arg(root.path().join("DEBIAN").join(script)));
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let root = tempfile::tempdir().unwrap();
    unpack(root.path());
    let unit = std::fs::read_to_string(root.path().join("lib/systemd/system/breakwater.service")).unwrap();
    for line in [
        "User=breakwater",
        "ExecStart=/usr/bin/breakwater serve --config /etc/breakwater/breakwater.toml",
        "Restart=on-failure",
        "StateDirectory=breakwater",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/breakwater",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks `{line}`");
    }
    // systemd-analyze checks that ExecStart's binary exists: point it at the one
    // unpacked here, in a copy of the unit.
    let binary = root.path().join("usr/bin/breakwater");
    let checked = root.path().join("breakwater.service");
    std::fs::write(
        &checked,
        unit.replace(
            "ExecStart=/usr/bin/breakwater",
            &format!("ExecStart={}", binary.display()),
        ),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&checked)
        .output()
        .expect("systemd-analyze is needed (the systemd package)");
    let complaints = String::from_utf8_lossy(&output.stderr);
    // Only complaints about this unit count (not the host's other units).
    let ours: Vec<&str> = complaints
        .lines()
        .filter(|l| l.contains("breakwater.service"))
        .collect();
    assert!(
        output.status.success() && ours.is_empty(),
        "systemd-analyze verify: {complaints}"
    );
}

#[test]
fn the_packaged_binary_starts_with_the_packaged_config_and_takes_events() {
    let root = tempfile::tempdir().unwrap();
    unpack(root.path());
    let binary = root.path().join("usr/bin/breakwater");
    let config = root.path().join("etc/breakwater/breakwater.toml");
    run(Command::new(&binary).args(["config", "check", "--config"]).arg(&config));

    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(&binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if entry["message"] == "breakwater listening" {
                let _ = sender.send(entry["addr"].as_str().unwrap().to_string());
            }
        }
    });
    let addr = receiver
        .recv_timeout(Duration::from_secs(20))
        .expect("the packaged binary logs `breakwater listening` in JSON (the packaged config's log format)");
    let answer = reqwest::blocking::Client::new()
        .post(format!("http://{addr}/v1/track"))
        .json(&serde_json::json!({ "userId": "u1", "event": "Installed", "messageId": "deb-1" }))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 200);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let events = std::fs::read_dir(data.path().join("events")).unwrap().count();
    assert!(events >= 1, "the event is in the file sink");
}
