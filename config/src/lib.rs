//! weir's configuration file and the control API types shared by `weir` and `weirctl`.
//!
//! The config is one TOML file. [`Config::load`] reads and validates it whole: TOML syntax,
//! the schema (unknown keys are errors, so a typo never silently falls back to a default) and
//! the cross-field rules (unique names, non-empty pools, ...). Every problem is reported with
//! `file:line:column` and what was expected, so an operator can fix a file in one pass.

pub mod address;
pub mod control;
mod error;
mod schema;

pub use error::{ConfigError, Diagnostic};
pub use schema::*;
