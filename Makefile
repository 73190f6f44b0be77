# Development targets (CONTRIBUTING.md says when to run each). `make help` lists them.
.PHONY: help demo test docs-check fmt clippy emulator fuzz bench plan gpu-bundle ci

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

demo: ## the README's first command: pretrain on built-in phantoms (~1 min on 2 cores)
	cargo run --release --bin vox2vec-train -- --small

test: ## the README's test command (what CI runs)
	cargo test --release

docs-check: ## README.md, CONTRIBUTING.md and docs/ name only files, flags and variables that exist
	cargo test --release --test docs_check

fmt: ## format the tree as rustfmt.toml says (crate and fuzz targets)
	cargo fmt
	cargo fmt --manifest-path fuzz/Cargo.toml

clippy: ## clippy without warnings, CPU build and emulator build (as CI)
	cargo clippy --release --all-targets -- -D warnings
	cargo clippy --release --all-targets --features cuda-emulator -- -D warnings

emulator: ## the GPU tests on the CUDA emulator (10-15 min on 2 cores); FILTER=name runs some
	VOX2VEC_CUDA_EMULATOR=1 cargo test --release --features cuda-emulator --test gpu -- $(FILTER)

fuzz: ## fuzz the file readers (nightly + cargo-fuzz); FUZZ_SECONDS=60 per target, TARGETS=all
	scripts/fuzz.sh $(or $(FUZZ_SECONDS),60) $(TARGETS)

bench: ## CPU benchmarks (criterion)
	cargo bench --bench cpu

plan: ## the performance model of the reference step on an H100, no GPU needed
	cargo run --release --bin vox2vec-train -- --bench-plan --precision bf16 --card h100

gpu-bundle: ## build the GPU bundle here; run it on a GPU with: bash gpu-bundle/run.sh
	scripts/gpu-bundle.sh

ci: ## what CI runs, on this machine
	.ci/run
