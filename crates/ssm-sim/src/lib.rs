//! ssm-sim
