//! Bad input at the daemon binary's edge: each gets one clear line and a non-zero exit
//! (`weirctl`'s are in its own package).

use std::process::{Command, Output};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .unwrap()
}

fn one_line_stderr(out: &Output) -> String {
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr:?}"
    );
    stderr.trim_end().to_string()
}

#[test]
fn missing_config_is_one_line_naming_the_file() {
    let out = weir(&["--config", "/nonexistent/weir.toml"]);
    assert!(!out.status.success());
    let line = one_line_stderr(&out);
    assert_eq!(
        line,
        "weir: /nonexistent/weir.toml: cannot read config: No such file or directory (os error 2)"
    );
}

#[test]
fn invalid_toml_is_one_line_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(&path, "[daemon]\ncontrol_socket = \n").unwrap();
    let out = weir(&["--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let line = one_line_stderr(&out);
    let expected_prefix = format!("weir: {}:2:18: ", path.display());
    assert!(line.starts_with(&expected_prefix), "{line}");
}

#[test]
fn config_that_fails_validation_names_the_problem_and_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(
        &path,
        "[[vhost]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nhosts = [\"a.test\"]\nservers = []\n",
    )
    .unwrap();
    let out = weir(&["--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let line = one_line_stderr(&out);
    assert_eq!(
        line,
        format!(
            "weir: {}:5:11: a pool needs at least one server",
            path.display()
        )
    );
}
