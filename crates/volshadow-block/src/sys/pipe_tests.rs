//! What the public API cannot set up: a pipe someone else owns.

use super::*;

/// A name squatted by another principal (here Guests, with a DACL that
/// lets everyone in): the client refuses it before sending anything.
#[test]
fn a_pipe_another_user_owns_is_refused() {
    let name = format!(r"\\.\pipe\volshadow-test-squat-{}", std::process::id());
    let sd = Descriptor::from_sddl("O:BGD:P(A;;GA;;;WD)").unwrap();
    let _squatter = match create_instance(&name, &sd, true) {
        Ok(h) => h,
        Err(e) => {
            // Windows lets a process name another owner only with
            // SeRestorePrivilege.
            eprintln!("SKIP: cannot make a pipe another principal owns here: {e}");
            return;
        }
    };
    let e = PipeStream::connect(&name, Duration::from_secs(2)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("another user"), "{e}");
}
