"""An OpenAI-compatible server on the continuous-batching engine (:mod:`lmstack.serve.engine`,
:mod:`lmstack.serve.app`); ``lmstack serve RUN`` runs it (docs/serve.md)."""
