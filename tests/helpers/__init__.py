"""Test helpers and test infrastructure (not tests): tiny random models and tokenizers, and the offline local
Hugging Face Hub (`hub_server`: downloads through olah from local git repositories; `hub_commit_server`: a
small local commit endpoint for uploads; `hub_fixtures`: the pytest fixtures `hub_server` and `hub_client`)."""
