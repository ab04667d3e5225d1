#!/bin/sh
# Simulator fidelity, full figures (issue P1.1): `fulcrum simulate` against `fulcrum serve`
# with `fulcrum mock-backend` processes, every scenario, in a release build. Prints one table
# (sim and real rows per scenario and policy) and fails when a tolerance is not met. The CI
# variant is `cargo test -p fulcrum --test integration fidelity::`.
set -eu
cd "$(dirname "$0")/../.."
exec cargo test --release -p fulcrum --test integration fidelity::fidelity_full -- --ignored --nocapture
