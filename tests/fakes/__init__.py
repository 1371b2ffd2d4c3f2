"""Local HTTP servers that speak the protocols of the SaaS we call (OpenAI, WhatsApp Cloud API,
Evolution API, Google Sheets), with fault knobs. For tests and benchmarks only; never imported
by a service.

Each fake is an async context manager returning its base URL, with its knobs as attributes
(changeable while it runs) and what it received recorded on the object::

    fake = FakeWhatsApp()
    async with fake as base_url:
        fake.script_errors(131056)
        ...
        assert fake.sent[0]["text"] == "..."

and a command-line server: ``python -m tests.fakes.openai --port 9001 --latency-ms 300 --error-rate 0.1``.
"""
