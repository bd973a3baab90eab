# Both targets set up .venv first (scripts/setup.sh: torch 2.13.0, then the project).
.PHONY: setup run test

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/ctd run $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
