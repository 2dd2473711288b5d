"""Redaction: secrets from the config never reach a log line, whatever carries them."""

import io
import json

from worker.config.load import parse
from worker.observe import logs


def test_sasl_password_and_token_are_redacted_everywhere():
    cfg = parse(
        {
            "kafka": {
                "topics": ["t"],
                "security": {
                    "protocol": "SASL_SSL",
                    "sasl_mechanism": "PLAIN",
                    "sasl_username": "u",
                    "sasl_password_env": "PW",
                },
            },
            "cloudflare": {
                "accounts": {"a": {"plan": "pro"}},
                "zones": [{"id": "a" * 32, "hosts": ["a.com"]}],
            },
            "rules": [{"name": "r", "urls": ["https://a.com/"]}],
        },
        "c.yaml",
        {"PW": "kafka-pass-123456", "CLOUDFLARE_API_TOKEN": "cf-token-abcdef"},
    )
    assert "kafka-pass" not in repr(cfg) and "cf-token" not in repr(cfg)
    logs.register_secrets(cfg.secrets())
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)
    log = logs.structlog.get_logger("t")
    log.info("connecting", password="kafka-pass-123456", nested={"h": ["Bearer cf-token-abcdef"]})
    try:
        raise RuntimeError("auth failed for cf-token-abcdef")
    except RuntimeError:
        log.exception("boom")
    log.warning("err", error=ValueError("kafka-pass-123456 rejected"))
    text = stream.getvalue()
    assert "kafka-pass-123456" not in text and "cf-token-abcdef" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["password"] == "***" and lines[0]["nested"] == {"h": ["Bearer ***"]}
    assert "***" in lines[1]["exception"]
    assert lines[2]["error"] == "ValueError: *** rejected"
