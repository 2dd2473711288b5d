"""The Helm chart: lint, render for realistic values, validate offline against the Kubernetes
schemas, and check the essentials a user relies on."""

import base64
import json
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from worker.config.load import parse

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "purge-worker"
VALUES = sorted((ROOT / "helm" / "values").glob("*.yaml"))
K8S_VERSION = "1.31.0"
# Not in the core schemas: checked by hand below.
CRDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication", "PrometheusRule"}
ZONE = (
    "cloudflare.zones[0].id=023e105f4ecef8ad9ca31a8372d0c353",
    "cloudflare.zones[0].hosts[0]=a.com",
)
ACCOUNT_ID = ("cloudflare.accounts.main.account_id=5f3c1d0b9a2e48f7c6d1e0a9b8c7d6e5",)


def helm_binary() -> str:
    path = os.environ.get("HELM") or str(Path.home() / ".cache/purge-worker/helm-v3.22.0/helm")
    if not Path(path).exists():
        pytest.fail(f"helm not found at {path}: run `make helm` (make test does)", pytrace=False)
    return path


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, check=check)


def render(*values: str | Path, sets: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", "cms"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind, suffix=""):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def test_helm_lint():
    # The defaults alone cannot run (no zone): lint says so, naming the key.
    result = helm("lint", str(CHART), "--strict", check=False)
    assert result.returncode != 0 and "zones" in result.stdout + result.stderr
    for values in VALUES:
        result = helm("lint", str(CHART), "--strict", "-f", str(values), check=False)
        assert result.returncode == 0, f"{values.name}: {result.stdout}{result.stderr}"


@pytest.mark.parametrize("values", VALUES, ids=[v.stem for v in VALUES])
def test_renderings_validate_against_kubernetes_schemas(values):
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "Service", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "purge-worker"
        assert labels["app.kubernetes.io/instance"] == "rel"


def test_probes_security_and_secret_handling():
    docs = render(ROOT / "helm/values/realistic.yaml")
    deploy = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    config = yaml.safe_load(by_kind(docs, "ConfigMap", "purge-worker")["data"]["config.yaml"])
    assert ports == {
        "metrics": config["observability"]["metrics_port"],
        "health": config["observability"]["health_port"],
    }
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] > config["delivery"]["drain_deadline_seconds"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("CLOUDFLARE_API_TOKEN", "KAFKA_PASSWORD"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "purge-worker-credentials"
    assert not [d for d in docs if d["kind"] == "Secret"]  # an existing Secret is used


def test_chart_created_secret_never_inlines_the_token():
    token = "tok-" + "z" * 30
    docs = render(
        ROOT / "helm/values/hpa.yaml",
        sets=("existingSecret=", "secret.create=true", f"secret.apiToken={token}"),
    )
    secret = by_kind(docs, "Secret")
    # A rotated token rolls the pods: the Secret's checksum is in their template.
    rotated = render(
        ROOT / "helm/values/hpa.yaml",
        sets=("existingSecret=", "secret.create=true", f"secret.apiToken={token}x"),
    )
    sums = [
        by_kind(d, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        for d in (docs, rotated)
    ]
    assert sums[0] != sums[1]
    assert base64.b64decode(secret["data"]["cloudflare-api-token"]).decode() == token
    for doc in docs:
        if doc["kind"] != "Secret":
            assert token not in yaml.safe_dump(doc)


def test_config_checksum_changes_when_rules_change(tmp_path):
    base = ROOT / "helm/values/hpa.yaml"
    extra = tmp_path / "more.yaml"
    extra.write_text(yaml.safe_dump({"rules": [{"name": "other", "hosts": ["www.example.com"]}]}))

    def annotations(*values):
        return by_kind(render(*values), "Deployment")["spec"]["template"]["metadata"]["annotations"]

    a, b = annotations(base), annotations(base, extra)
    assert a["checksum/rules"] != b["checksum/rules"]
    assert a["checksum/config"] == b["checksum/config"]
    c = by_kind(render(base, sets=("worker.coalesce.window_seconds=3",)), "Deployment")
    assert (
        c["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != a["checksum/config"]
    )


def test_rendered_config_and_rules_are_accepted_by_the_worker(tmp_path):
    docs = render(ROOT / "helm/values/realistic.yaml")
    config = yaml.safe_load(by_kind(docs, "ConfigMap", "purge-worker")["data"]["config.yaml"])
    rules = by_kind(docs, "ConfigMap", "-rules")["data"]["rules.yaml"]
    (tmp_path / "rules.yaml").write_text(rules)
    config["rules_files"] = [str(tmp_path / "rules.yaml")]
    parsed = parse(config, "rendered.yaml", {"KAFKA_PASSWORD": "p", "CLOUDFLARE_API_TOKEN": "t"})
    assert [r.name for r in parsed.rules.rules] == ["article-pages"]
    assert parsed.kafka.security.sasl_mechanism == "SCRAM-SHA-512"


def test_keda_hpa_and_network_policy():
    keda = render(ROOT / "helm/values/keda.yaml")
    scaled = by_kind(keda, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["maxReplicaCount"] == 12  # capped at the partition count (asked 20)
    assert {t["metadata"]["topic"] for t in scaled["spec"]["triggers"]} == {
        "cms.content",
        "cms.assets",
    }
    assert all(t["metadata"]["consumerGroup"] == "purge-worker" for t in scaled["spec"]["triggers"])
    deploy = by_kind(keda, "Deployment")
    assert "replicas" not in deploy["spec"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == "cms-purge-rules"
    assert not [
        d for d in keda if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-rules")
    ]
    hpa = by_kind(render(ROOT / "helm/values/hpa.yaml"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 4
    policy = by_kind(render(ROOT / "helm/values/realistic.yaml"), "NetworkPolicy")
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 9092, 443} <= egress_ports
    monitor = by_kind(render(ROOT / "helm/values/realistic.yaml"), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("replicaCount=-1",), "replicaCount"),
        (("cloudflare.zones[0].id=not-a-zone", "cloudflare.zones[0].hosts[0]=a.com"), "id"),
        (("kafka.security.protocol=SASL",), "protocol"),
        (("kafka.topics=null",), "topics"),
        (("metrics.port=70000",), "port"),
        (("cloudflare.accounts.main.plan=gold",), "plan"),
        (("replicas=3",), "replicas"),  # a typo of replicaCount
        # The worker's own settings, checked by the schema generated from its config model.
        (("worker.coalesce.window_seconds=-1",), "window_seconds"),
        (("worker.delivery.retry.budget_seconds=-5",), "budget_seconds"),
        (("worker.coalesce.windowseconds=1",), "windowseconds"),
        (("worker.delivery.unknown_zone=ignore",), "unknown_zone"),
        (("kafka.bootstrapServers[0]=::1:9092",), "bootstrapServers"),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(sets, message):
    args = ["template", "rel", str(CHART), "--set", ZONE[0], "--set", ZONE[1]]
    for s in sets:
        args += ["--set", s]
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("keda.enabled=true", "autoscaling.enabled=true"), "enable only one"),
        (("worker.delivery.drain_deadline_seconds=5",), "set drainDeadlineSeconds"),
        (("secret.create=true",), "secret.apiToken is required"),
        (
            ("cloudflare.accounts.other.plan=pro", "cloudflare.zones[0].account=main"),
            "cloudflare.accounts.other.account_id is required with kafka.budgetTopic",
        ),
        (("kafka.security.saslMechanism=PLAIN",), "sends no SASL credentials"),
        (("kafka.security.protocol=SASL_SSL",), "needs kafka.security.saslMechanism"),
        (("kafka.tls.secretName=kafka-ca",), "does not use TLS"),
        (("cloudflare.zones[0].account=nope",), "nope is not one of the accounts"),
        (
            (
                "cloudflare.accounts.shop-eu.plan=pro",
                "cloudflare.accounts.shop-eu.account_id=a",
                "cloudflare.accounts.shop-eu.tokenSecret.name=s1",
                "cloudflare.accounts.shop-eu.tokenSecret.key=t",
                "cloudflare.accounts.shop_eu.plan=pro",
                "cloudflare.accounts.shop_eu.account_id=b",
                "cloudflare.accounts.shop_eu.tokenSecret.name=s2",
                "cloudflare.accounts.shop_eu.tokenSecret.key=t",
                "cloudflare.zones[0].account=main",
            ),
            "would both read their token from CLOUDFLARE_API_TOKEN_SHOP_EU",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_reason(sets, message):
    args = ["template", "rel", str(CHART)]
    for s in (*ZONE, *ACCOUNT_ID):
        args += ["--set", s]
    for s in sets:
        args += ["--set", s]
    result = helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_dockerfile_is_multi_stage_non_root_and_runs_the_worker():
    text = (ROOT / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) >= 2 and " AS build" in froms[0]
    user = next(line for line in text.splitlines() if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["purge-worker"]' in text and '"run"' in text
    final = text.split(froms[-1], 1)[1]
    assert "gcc" not in final and "build-essential" not in final
    # The base pinnable by digest, the dependencies installed exactly as locked.
    assert "ARG PYTHON_IMAGE=" in text and "FROM ${PYTHON_IMAGE}" in text
    assert "--require-hashes -r requirements.lock" in text and "--no-deps ." in text


def test_the_lock_pins_every_dependency_with_hashes():
    import tomllib

    from packaging.requirements import Requirement

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = (ROOT / "requirements.lock").read_text()
    pinned = dict(re.findall(r"^([a-z0-9._-]+)==(\S+) \\$", lock, flags=re.M))
    for spec in declared:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pinned[name]), f"{name}=={pinned[name]} vs {spec}"
    blocks = re.split(r"^(?=[a-z0-9._-]+==)", lock, flags=re.M)[1:]
    assert blocks and all("--hash=sha256:" in block for block in blocks)


def test_the_charts_worker_schema_is_the_config_models():
    from scripts.chart_schema import CHART_SCHEMA, synced

    current = json.loads(CHART_SCHEMA.read_text())
    expected = synced(json.loads(CHART_SCHEMA.read_text()))
    assert current == expected, "the chart's schema is out of date: run `make chart-schema`"


def test_multi_account_tokens_each_come_from_their_own_secret_and_tls_is_mounted(tmp_path):
    docs = render(ROOT / "helm/values/multi-account.yaml")
    deploy = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    refs = {
        name: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for name, e in env.items()
        if "valueFrom" in e
    }
    assert refs == {
        "CLOUDFLARE_API_TOKEN_NEWS": ("cloudflare-news", "api-token"),
        "CLOUDFLARE_API_TOKEN_SHOP": ("cloudflare-shop", "api-token"),
    }
    assert env["TZ"]["value"] == "UTC"  # extraEnv
    config = yaml.safe_load(by_kind(docs, "ConfigMap", "purge-worker")["data"]["config.yaml"])
    accounts = config["cloudflare"]["accounts"]
    assert {n: a["token_env"] for n, a in accounts.items()} == {
        "news": "CLOUDFLARE_API_TOKEN_NEWS",
        "shop": "CLOUDFLARE_API_TOKEN_SHOP",
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kafka-tls"]["secret"]["secretName"] == "kafka-client-tls"
    assert mounts["kafka-tls"]["readOnly"] is True
    tls_dir = mounts["kafka-tls"]["mountPath"]
    security = config["kafka"]["security"]
    assert security["ssl_cafile"] == f"{tls_dir}/ca.crt"
    assert (security["ssl_certfile"], security["ssl_keyfile"]) == (
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
    )
    assert container["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    # The worker accepts the rendered config, each account with its own token.
    rules = by_kind(docs, "ConfigMap", "-rules")["data"]["rules.yaml"]
    (tmp_path / "rules.yaml").write_text(rules)
    config["rules_files"] = [str(tmp_path / "rules.yaml")]
    environ = {"CLOUDFLARE_API_TOKEN_NEWS": "tok-news", "CLOUDFLARE_API_TOKEN_SHOP": "tok-shop"}
    parsed = parse(config, "rendered.yaml", environ)
    assert {n: a.credentials.secrets() for n, a in parsed.accounts.items()} == {
        "news": ["tok-news"],
        "shop": ["tok-shop"],
    }
    assert parsed.kafka.security.ssl_certfile == f"{tls_dir}/tls.crt"


def test_network_policy_is_closed_unless_opened():
    closed = by_kind(
        render(sets=(*ZONE, *ACCOUNT_ID, "networkPolicy.enabled=true")), "NetworkPolicy"
    )
    assert closed["spec"]["ingress"] == []
    opened = by_kind(render(ROOT / "helm/values/realistic.yaml"), "NetworkPolicy")
    (rule,) = opened["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [9464]
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    multi = by_kind(render(ROOT / "helm/values/multi-account.yaml"), "NetworkPolicy")
    kafka = next(r for r in multi["spec"]["egress"] if r["ports"][0]["port"] == 9093)
    assert kafka["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_helm_test_pod_checks_online_with_the_releases_config():
    docs = render(ROOT / "helm/values/multi-account.yaml")
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = test_pod["spec"]["containers"]
    assert container["args"] == ["check", "-c", "/etc/purge-worker/config.yaml", "--online"]
    deploy = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert container["env"] == deploy["containers"][0]["env"]
    assert test_pod["spec"]["volumes"] == deploy["volumes"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_example_values_hold_no_secret_literals():
    for values in VALUES:
        data = yaml.safe_load(values.read_text())
        secret = data.get("secret") or {}
        assert not secret.get("create"), values.name
        assert not secret.get("apiToken") and not secret.get("kafkaPassword"), values.name


def _metric_names() -> set[str]:
    from worker.observe import metrics

    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        names |= {s.name for s in family.samples}
    # Counters are exported with _total, histograms with _bucket/_sum/_count.
    names |= {n + "_total" for n in names}
    names |= {n + suffix for n in names for suffix in ("_bucket", "_sum", "_count")}
    return names


def _used_metrics(text: str) -> set[str]:
    return set(re.findall(r"purge_worker_[a-z_]+", text))


def test_dashboard_and_alerts_use_only_metrics_the_worker_exports():
    docs = render(ROOT / "helm/values/realistic.yaml")
    dashboard = by_kind(docs, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["purge-worker.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    rules = by_kind(docs, "PrometheusRule")["spec"]
    alert_exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    exported = _metric_names()
    for text in (exprs, alert_exprs):
        used = _used_metrics(text)
        assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("kind and status", "event age", "lag", "pending", "dead letters", "budget"):
        assert topic in titles, topic


def promtool_binary() -> str:
    path = os.environ.get("PROMTOOL") or str(
        Path.home() / ".cache/purge-worker/promtool-v0.316.0/promtool"
    )
    if not Path(path).exists():
        pytest.fail(f"promtool not found at {path}: run `make promtool` (make test does)")
    return path


def test_alert_rules_pass_promtool(tmp_path):
    rules = by_kind(render(ROOT / "helm/values/realistic.yaml"), "PrometheusRule")["spec"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool_binary(), "check", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout + result.stderr


def test_the_default_values_ask_for_a_zone():
    result = helm("template", "rel", str(CHART), check=False)
    assert result.returncode != 0
    assert "/cloudflare/zones" in result.stderr and "minItems" in result.stderr, result.stderr


def test_keda_reads_the_lag_with_the_workers_own_kafka_credentials():
    docs = render(ROOT / "helm/values/keda.yaml")
    scaled = by_kind(docs, "ScaledObject")
    auth = by_kind(docs, "TriggerAuthentication")
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert trigger["metadata"]["sasl"] == "scram_sha512"
        assert trigger["metadata"]["tls"] == "enable"
        assert trigger["metadata"]["bootstrapServers"] == "kafka-0.kafka:9093,[fd00::12]:9093"
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "password": ("purge-worker-credentials", "kafka-password"),
        "ca": ("kafka-ca", "ca.crt"),
    }
    (env,) = auth["spec"]["env"]
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    values = {e["name"]: e.get("value") for e in container["env"]}
    assert env["parameter"] == "username" and values[env["name"]] == "purge-worker"
    mtls = render(ROOT / "helm/values/multi-account.yaml", sets=("keda.enabled=true",))
    params = {
        r["parameter"] for r in by_kind(mtls, "TriggerAuthentication")["spec"]["secretTargetRef"]
    }
    assert params == {"ca", "cert", "key"}
    assert "sasl" not in by_kind(mtls, "ScaledObject")["spec"]["triggers"][0]["metadata"]


def test_probes_are_whole_objects_with_a_startup_probe_covering_kafkas_retries():
    docs = render(
        ROOT / "helm/values/hpa.yaml",
        sets=("livenessProbe.timeoutSeconds=7", "readinessProbe.successThreshold=2"),
    )
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["timeoutSeconds"] == 7
    assert container["readinessProbe"]["successThreshold"] == 2
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "health"}
    # The worker retries an unreachable broker for 60 s before /healthz answers.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 90
    memory = container["resources"]["requests"]["memory"]
    assert memory.endswith("Mi") and int(memory[:-2]) >= 243  # the measured peak


def test_pods_spread_softly_and_are_scraped_once():
    plain = by_kind(render(ROOT / "helm/values/hpa.yaml"), "Deployment")["spec"]["template"]
    (spread,) = plain["spec"]["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert plain["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    monitored = by_kind(render(ROOT / "helm/values/realistic.yaml"), "Deployment")
    assert "prometheus.io/scrape" not in monitored["spec"]["template"]["metadata"]["annotations"]


def test_two_releases_in_one_namespace_keep_their_alerts_and_dashboards_apart():
    def rendered(name):
        args = ["template", name, str(CHART), "--namespace", "cms"]
        out = helm(*args, "-f", str(ROOT / "helm/values/realistic.yaml")).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    a, b = rendered("news"), rendered("shop")
    rules = [yaml.safe_dump(by_kind(d, "PrometheusRule")["spec"]) for d in (a, b)]
    assert 'job="news-purge-worker-metrics"' in rules[0]
    assert 'job="shop-purge-worker-metrics"' in rules[1]
    boards = [
        json.loads(by_kind(d, "ConfigMap", "-dashboard")["data"]["purge-worker.json"])
        for d in (a, b)
    ]
    assert boards[0]["uid"] != boards[1]["uid"] and all(len(x["uid"]) <= 40 for x in boards)
    jobs = [next(v for v in x["templating"]["list"] if v["name"] == "job") for x in boards]
    assert jobs[0]["current"]["value"] == ["news-purge-worker-metrics"]
    exprs = [t["expr"] for p in boards[0]["panels"] for t in p["targets"]]
    assert all('job=~"$job"' in e for e in exprs)


JOB = 'namespace="cms",job="rel-purge-worker-metrics"'
OTHER = 'namespace="cms",job="other-purge-worker-metrics"'


def _series(metric: str, values: str, job: str = JOB, **labels: str) -> dict:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return {"series": f"{metric}{{{job}{extra}}}", "values": values}


def _alert_cases() -> list[dict]:
    """promtool unit tests: each alert fires when it should, and not on what only looks like
    it (a stale lag series, another release's series)."""

    def case(series, evals):
        return {"interval": "1m", "input_series": series, "alert_rule_test": evals}

    def fires(name, at, **labels):
        return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels}]}

    def silent(name, at):
        return {"eval_time": at, "alertname": name, "exp_alerts": []}

    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    ns = {"namespace": "cms", "job": "rel-purge-worker-metrics"}
    p = "purge_worker_"
    last = _series(p + "last_record_timestamp_seconds", "0x30", pod="p")
    bucket = p + "event_age_seconds_bucket"
    return [
        # Records waiting and none finished for long: stuck.
        case(
            [_series(p + "consumer_lag", "3x30", topic="t", partition="0"), last],
            [fires("PurgeWorkerStuck", "20m", **crit, **ns)],
        ),
        # The partition moved to another worker and its lag series went away: not stuck.
        case(
            [_series(p + "consumer_lag", "3x2 stale", topic="t", partition="0"), last],
            [silent("PurgeWorkerStuck", "20m")],
        ),
        # Another release's lag in the same namespace is not ours.
        case(
            [_series(p + "consumer_lag", "3x30", OTHER, topic="t", partition="0"), last],
            [silent("PurgeWorkerStuck", "20m")],
        ),
        case(
            [
                _series(bucket, "0x30", le="60"),
                _series(bucket, "0+10x30", le="300"),
                _series(bucket, "0+10x30", le="+Inf"),
            ],
            [fires("PurgeWorkerPurgesLate", "20m", **warn)],
        ),
        case(
            [_series(p + "dead_letters_total", "0 0 5 5 5", error_class="api_rejected")],
            [
                fires("PurgeWorkerDeadLetters", "4m", **warn, error_class="api_rejected"),
                silent("PurgeWorkerDeadLetters", "1m"),
            ],
        ),
        case(
            [_series(p + "api_rate_limited_total", "0 2 2")],
            [fires("PurgeWorkerRateLimited", "2m", **warn)],
        ),
        case(
            [_series(p + "api_cap_rejected_total", "0 1 1", kind="files")],
            [fires("PurgeWorkerCapRejected", "2m", **warn)],
        ),
        case(
            [_series(p + "last_poll_timestamp_seconds", "0x10", pod="p")],
            [fires("PurgeWorkerNotPolling", "6m", **crit, pod="p")],
        ),
        case(
            [_series(p + "warm_hit_after_purge_total", "0 3 3", zone="z")],
            [fires("PurgeWorkerPurgeMissed", "2m", **warn, zone="z")],
        ),
        # Receipts failing for a quarter of an hour; a blip while the broker restarts is not.
        case(
            [
                _series(p + "receipts_total", "0+5x30", outcome="dropped"),
                _series(p + "receipts_total", "0+100x30", outcome="written"),
            ],
            [fires("PurgeWorkerReceiptsLost", "25m", **warn, **ns)],
        ),
        case(
            [_series(p + "receipts_total", "0 0 3 3 3 3 3 3 3 3 3 3 3 3 3", outcome="failed")],
            [silent("PurgeWorkerReceiptsLost", "18m")],
        ),
        # Nobody of this release scraped: every other alert is blind, this one says so.
        case(
            [_series("up", "1x20", OTHER, pod="q")],
            [fires("PurgeWorkerAbsent", "10m", **crit, **ns)],
        ),
        case(
            [_series("up", "1x20", pod="p")],
            [silent("PurgeWorkerAbsent", "10m"), silent("PurgeWorkerDown", "10m")],
        ),
        case([_series("up", "0x20", pod="p")], [fires("PurgeWorkerDown", "10m", **crit, **ns)]),
    ]


def test_every_alert_fires_when_it_should_and_not_on_stale_or_foreign_series(tmp_path):
    rules = by_kind(render(ROOT / "helm/values/realistic.yaml"), "PrometheusRule")["spec"]
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # what fires is tested here; the words are not
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    cases = _alert_cases()
    tested = {e["alertname"] for c in cases for e in c["alert_rule_test"]}
    assert tested == {r["alert"] for g in rules["groups"] for r in g["rules"]}
    spec = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": cases}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [promtool_binary(), "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
