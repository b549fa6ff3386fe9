//! Deterministic tests of the driver (see below).
