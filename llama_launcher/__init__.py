"""neverdark's launcher for llama-cpp-python 0.3.36's OpenAI-compatible server, fixed for a
small host. Run as `python -m llama_launcher` with llama-cpp-python's own server options
(neverdark.engines builds the command line and the environment, for the units and for the
tests and benchmarks alike); the deploy uploads this package to /opt/neverdark/llama/lib.

What llama-cpp-python's own server gets wrong here, and what the launcher does instead (each
measured on the test fleet):

- Memory (cache.py). Its RAM prompt cache stores `Llama.save_state()`, which copies `_scores`
  (n_batch x n_vocab floats: 512 MiB for Gemma 3) into every entry while the cache counts only
  the KV state against its capacity: 575 MB grew to 12 GB in a dozen conversations, each save
  taking seconds. With `logits_all` off those scores are never written (sampling reads the
  context's own logits), so here a saved state is the KV state and the prompt's token ids only,
  and the cache counts every byte it holds against NEVERDARK_CACHE_BYTES. The cache is always
  on: it is what keeps each wizard's prompt prefix (computed by the sidecar's check turn before
  a switch, then by the wizard's own turns) while other wizards use the one context.
- Sliding-window models (cache.py). Its server has no `swa_full` flag; llama.cpp's default
  keeps a full-size window cache (about 1 GB more at n_ctx 65536 for Gemma 3).
  NEVERDARK_SWA_FULL (default false) sets it. With the window cache small, reusing a prefix is
  only sound while the cells of the window before the reuse point are still held: a prefix is
  reused from the live context or a saved state only when no more than one micro-batch was
  evaluated past it.
- Routes that need no model take no lock (routes.py). Every route of its server, `/v1/models`
  included, waits for the generation in flight, and clients probe a lot: Hermes asks
  `/api/v1/models`, `/api/tags`, `/v1/props`, `/props` and `/version` before every local turn
  until one answers like a server it knows. Here `/health`, `/v1/models`, `/props` and
  `/v1/props` (llama.cpp's shape, so Hermes recognises it and stops probing),
  `/neverdark/status` and `/metrics` answer at once.
- Where each completion's time went (timings.py), the way llama.cpp's own llama-server says it:
  every chat or text completion gets a `timings` object with native llama-server's keys
  (prompt_n = prompt tokens evaluated, cache_n = prompt tokens reused, prompt_ms, predicted_n,
  predicted_ms) plus what only this server has: queue_ms (waiting for the single generation
  lock), cache_save_ms and cache_load_ms (the prompt cache's state copies). It is added to the
  response (the last chunk when streamed), printed to stderr as one `neverdark-timings {json}`
  line (the journal), and summed in `GET /metrics` under native llama-server's metric names, so
  one scraper reads either engine.

- A key (auth.py), when the server is reached by other hosts of the fleet: read from
  LLAMA_API_KEY in the unit's EnvironmentFile, as llama-server reads it, never from argv.

Everything else is llama-cpp-python's own server, started with the same command line. Only
the standard library and what the llama venv has (llama-cpp-python[server], numpy).
"""

VERSION = "0.3.36"   # the llama-cpp-python release whose internals the launcher patches
