//! The config loader on any text: it never panics; a config it accepts plans into L7 vhosts
//! without error (what the daemon does next on start and reload).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_config::Config;
use weir_forwarder::vhosts::Vhosts;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(std::path::Path::new("fuzz.toml"), text) {
        Vhosts::plan(&config, None).expect("an accepted config plans");
    }
});
