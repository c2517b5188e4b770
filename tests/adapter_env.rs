//! `WGRAD_ADAPTER` naming no adapter gives `Error::NoAdapter`. Alone in its own test binary
//! because it sets an environment variable, which other tests' threads would see.

use wgrad::{Device, Error};

#[test]
fn unknown_adapter_name_is_no_adapter() {
    // SAFETY: this binary has this one test, so no other thread reads the environment.
    unsafe { std::env::set_var("WGRAD_ADAPTER", "no-such-adapter") };
    let result = Device::new();
    unsafe { std::env::remove_var("WGRAD_ADAPTER") };
    let err = match result {
        Ok(device) => panic!("WGRAD_ADAPTER=no-such-adapter picked {device:?}"),
        Err(err) => err,
    };
    match &err {
        Error::NoAdapter { detail } => {
            assert!(detail.contains("no-such-adapter"), "{detail}");
            assert!(detail.contains("adapters present"), "{detail}");
        }
        e => panic!("expected NoAdapter, got {e:?}"),
    }
    let msg = err.to_string();
    for needle in ["no GPU adapter", "WGRAD_ADAPTER", "no-such-adapter", "lavapipe"] {
        assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
    }

    // With the variable gone, a device is found again.
    let device = Device::new().expect("an adapter without the filter");
    assert!(!device.info().name.is_empty());
}
