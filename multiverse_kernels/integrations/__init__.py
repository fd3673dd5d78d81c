"""Integrations with model libraries. Import the submodule you need (e.g. ``.transformers``); each
imports its library lazily or at its own import, never from the package root."""
