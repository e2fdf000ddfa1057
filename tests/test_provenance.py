"""Provenance card: hash chain over every round's global model, tamper detection, CLI exit codes."""

import copy
import json

import numpy as np
import pytest
import torch

from fedmed import provenance
from fedmed.cli import main as cli_main

pytestmark = pytest.mark.unit  # pure and fast: the `pytest -m unit` tier


def _weights(seed):
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(4,)).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
    }


def _recorder(rounds=3):
    rec = provenance.ProvenanceRecorder(
        job="cxr_pneumonia_fedavg", network={"name": "small_cnn", "args": {"num_classes": 2}}
    )
    rec.record_initial_model(_weights(0))
    for r in range(rounds):
        rec.record_round(
            r,
            _weights(r + 1),
            [{"site": "site-2", "num_samples": 50}, {"site": "site-1", "num_samples": 120}],
            metrics={"mean_val_auc": 0.5 + 0.1 * r},
        )
    rec.set_site("site-1", num_val_samples=30, privacy_scope="standard")
    rec.set_site("site-2", num_val_samples=12, privacy_scope="dp", privacy={"epsilon": 1.5, "delta": 1e-5})
    return rec


def test_weights_hash_is_order_independent_and_sensitive_to_one_value():
    w = _weights(1)
    reordered = {k: w[k] for k in reversed(list(w))}
    assert provenance.weights_sha256(w) == provenance.weights_sha256(reordered)
    torch_w = {k: torch.from_numpy(np.array(v)) for k, v in w.items()}
    assert provenance.weights_sha256(torch_w) == provenance.weights_sha256(w)
    changed = copy.deepcopy(w)
    changed["conv.bias"][2] += 1e-6
    assert provenance.weights_sha256(changed) != provenance.weights_sha256(w)
    # dtype is part of the identity
    as64 = dict(w, **{"conv.bias": w["conv.bias"].astype(np.float64)})
    assert provenance.weights_sha256(as64) != provenance.weights_sha256(w)


def test_card_holds_sites_rounds_scopes_software_and_chain():
    card = _recorder(rounds=3).card()
    summary = card["summary"]
    assert summary["num_rounds"] == 3 and summary["rounds"] == [0, 1, 2]
    sites = {s["site"]: s for s in summary["sites"]}
    assert sites["site-1"]["num_train_samples"] == 120 and sites["site-1"]["num_val_samples"] == 30
    assert sites["site-2"]["privacy_scope"] == "dp" and sites["site-2"]["privacy"]["epsilon"] == 1.5
    assert sites["site-1"]["rounds_contributed"] == [0, 1, 2]
    assert summary["aggregation"]["method"] == "fedavg"
    for package in ("python", "torch", "numpy", "monai", "nvflare", "fedmed"):
        assert package in summary["software"]
    kinds = [r["kind"] for r in card["chain"]]
    assert kinds == ["initial", "round", "round", "round", "release"]
    assert card["chain"][0]["prev_record_sha256"] == provenance.GENESIS_SHA256
    for prev, rec in zip(card["chain"], card["chain"][1:]):
        assert rec["prev_record_sha256"] == prev["record_sha256"]
    assert card["chain"][-1]["model_sha256"] == provenance.weights_sha256(_weights(3))
    assert card["head_sha256"] == card["chain"][-1]["record_sha256"]
    assert provenance.verify_card(card).ok


def test_release_of_best_round_points_at_that_round_and_foreign_model_is_refused():
    rec = _recorder(rounds=3)
    card = rec.card(released_weights=_weights(2))  # round 1's global model
    release = card["chain"][-1]
    assert release["round"] == 1 and release["released_from_record"] == 2
    assert provenance.verify_card(card, _weights(2)).ok
    assert not provenance.verify_card(card, _weights(3)).ok
    with pytest.raises(provenance.ProvenanceError, match="match no recorded round"):
        rec.card(released_weights=_weights(99))


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_altering_any_model_hash_names_that_record(index):
    card = _recorder(rounds=3).card()
    card["chain"][index]["model_sha256"] = "f" * 64
    result = provenance.verify_card(card)
    assert not result.ok and result.broken_record == index
    assert f"record {index}" in result.message


@pytest.mark.parametrize("index", [1, 2, 3])
def test_recomputing_an_altered_records_hash_breaks_the_next_link(index):
    card = _recorder(rounds=3).card()
    record = card["chain"][index]
    record["contributors"][0]["num_samples"] = 10_000
    record["record_sha256"] = provenance.record_sha256(record)
    result = provenance.verify_card(card)
    assert not result.ok and result.broken_record == index + 1
    assert "prev_record_sha256" in result.message


def test_altering_the_summary_or_removing_a_round_fails():
    card = _recorder(rounds=3).card()
    tampered = copy.deepcopy(card)
    tampered["summary"]["sites"][0]["num_train_samples"] = 1
    result = provenance.verify_card(tampered)
    assert not result.ok and result.broken_record == 4 and "summary" in result.message

    removed = copy.deepcopy(card)
    del removed["chain"][2]
    result = provenance.verify_card(removed)
    assert not result.ok and result.broken_record == 2


def test_recorder_rejects_bad_inputs():
    rec = provenance.ProvenanceRecorder(job="j")
    with pytest.raises(provenance.ProvenanceError, match="initial model"):
        rec.record_round(0, _weights(1), [{"site": "a", "num_samples": 1}])
    rec.record_initial_model(_weights(0))
    with pytest.raises(provenance.ProvenanceError, match="site-x reported num_samples=0"):
        rec.record_round(0, _weights(1), [{"site": "site-x", "num_samples": 0}])
    with pytest.raises(provenance.ProvenanceError, match="NaN"):
        rec.record_round(0, _weights(1), [{"site": "a", "num_samples": 3}], metrics={"auc": float("nan")})


def test_cli_verifies_intact_card_and_model_file_and_names_first_broken_record(tmp_path, capsys):
    rec = _recorder(rounds=2)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in _weights(2).items()}, tmp_path / "global_model.pt")
    card = rec.write(tmp_path / "provenance.json", released_model_file="global_model.pt")
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"

    assert cli_main(["verify-provenance", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "global_model.pt matches" in out
    assert cli_main(["verify-provenance", str(tmp_path / "provenance.json"), "--head", card["head_sha256"]]) == 0
    assert cli_main(["verify-provenance", str(tmp_path), "--head", "0" * 64]) == 1

    # a model file changed after release is caught
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in _weights(7).items()}, tmp_path / "global_model.pt")
    assert cli_main(["verify-provenance", str(tmp_path)]) == 1
    assert "model file's weights do not match" in capsys.readouterr().err

    torch.save({k: torch.from_numpy(np.array(v)) for k, v in _weights(2).items()}, tmp_path / "global_model.pt")
    tampered = json.loads((tmp_path / "provenance.json").read_text())
    tampered["chain"][2]["model_sha256"] = "a" * 64
    (tmp_path / "provenance.json").write_text(json.dumps(tampered))
    assert cli_main(["verify-provenance", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "record 2 (round, round 1)" in err and "TAMPERED" in err


def test_cli_reports_missing_or_corrupt_card_by_path(tmp_path, capsys):
    assert cli_main(["verify-provenance", str(tmp_path / "nope.json")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err
    bad = tmp_path / "provenance.json"
    bad.write_text("{not json")
    assert cli_main(["verify-provenance", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_federated_round_records_reported_scopes_privacy_ledger_and_val_counts():
    rec = provenance.ProvenanceRecorder(job="j")
    rec.record_initial_model(_weights(0))
    reports = {
        "site-a": {"num_samples": 40, "privacy_scope": "standard", "metrics": {"train_loss": 0.3}},
        "site-b": {"num_samples": np.int64(25), "privacy_scope": "", "privacy": {"scope": "dp", "epsilon": np.float64(0.7), "delta": 1e-5}},
        "site-c": {"num_samples": 10},
    }
    record = rec.record_federated_round(0, _weights(1), reports, {"site-a": {"num_val_samples": 9}}, requested_scope="standard")
    by_site = {c["site"]: c for c in record["contributors"]}
    assert by_site["site-b"]["privacy"]["epsilon"] == 0.7 and by_site["site-b"]["privacy_scope"] == "dp"
    assert by_site["site-b"]["num_samples"] == 25 and "privacy" not in by_site["site-a"]
    sites = {s["site"]: s for s in rec.card()["summary"]["sites"]}
    assert sites["site-a"]["privacy_scope"] == "standard" and sites["site-a"]["num_val_samples"] == 9
    assert sites["site-c"]["privacy_scope"] == "standard" and sites["site-c"]["privacy_scope_source"].startswith("job")
    assert sites["site-b"]["privacy"]["epsilon"] == 0.7
    card = rec.card()
    assert provenance.verify_card(card).ok
    card["chain"][1]["contributors"][1]["privacy"]["epsilon"] = 0.1  # understate the privacy loss
    result = provenance.verify_card(card)
    assert not result.ok and result.broken_record == 1


# ---- signed cards (issue 19): a chain rewritten from the start fails against the project's root CA ----------


def _ca_and_cert(name):
    """(root CA PEM, server key PEM, server certificate PEM) of a throwaway PKI, as FLARE's CertBuilder makes them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def make(subject, issuer, public_key, signing_key, ca):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signing_key, hashes.SHA256()))

    root_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: a test key
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: a test key
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-root")])
    root = make(root_name, root_name, root_key.public_key(), root_key, True)
    server = make(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), root_name, server_key.public_key(), root_key, False)
    pem = serialization.Encoding.PEM
    key_pem = server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    return root.public_bytes(pem), key_pem, server.public_bytes(pem)


def rewrite_chain(card, model_sha256="b" * 64):
    """A wholesale rewrite: another model in round 0, every hash after it recomputed, the head too."""
    card = copy.deepcopy(card)
    card["chain"][1]["model_sha256"] = model_sha256  # round 0's global model
    if card["chain"][-1].get("released_from_record") == 1:  # a 1-round card releases that model
        card["chain"][-1]["model_sha256"] = model_sha256
    for index, record in enumerate(card["chain"]):
        if index:
            record["prev_record_sha256"] = card["chain"][index - 1]["record_sha256"]
        record["record_sha256"] = provenance.record_sha256(record)
    card["head_sha256"] = card["chain"][-1]["record_sha256"]
    return card


@pytest.mark.unit
def test_a_signed_card_verifies_against_its_root_ca_and_a_rewritten_chain_does_not(tmp_path, capsys):
    root_pem, key_pem, cert_pem = _ca_and_cert("project")
    (tmp_path / "kit" / "startup").mkdir(parents=True)
    for name, content in (("rootCA.pem", root_pem), ("server.key", key_pem), ("server.crt", cert_pem)):
        (tmp_path / "kit" / "startup" / name).write_bytes(content)
    signer = provenance.CardSigner.from_startup_kit(tmp_path / "kit" / "startup")
    assert provenance.CardSigner.from_startup_kit(tmp_path) is None  # no key there (the simulator): unsigned
    rec = _recorder(rounds=2)
    rec.signer = signer
    card = rec.write(tmp_path / "run" / "provenance.json")
    assert card["signature"]["signer"] == "localhost"
    assert "signed by 'localhost'" in provenance.signing_note(tmp_path / "run" / "provenance.json")
    kit = ["--kit", str(tmp_path / "kit")]
    assert cli_main(["verify-provenance", str(tmp_path / "run"), *kit]) == 0
    assert "VERIFIED: signed by 'localhost'" in capsys.readouterr().out
    assert provenance.verify_signature(card).status == "signed"  # no root CA given: matches, not anchored

    rewritten = rewrite_chain(card)
    assert provenance.verify_card(rewritten).ok  # the hash chain alone cannot tell
    (tmp_path / "run" / "provenance.json").write_text(json.dumps(rewritten))
    assert cli_main(["verify-provenance", str(tmp_path / "run")]) == 1  # the old signature no longer matches
    assert "does not match the card's content" in capsys.readouterr().err
    # ... re-signed with a key of another PKI: fails against the project's root CA
    other_root, other_key, other_cert = _ca_and_cert("forger")
    (tmp_path / "run" / "provenance.json").write_text(json.dumps(provenance.CardSigner(other_key, other_cert, other_root).sign(rewritten)))
    assert cli_main(["verify-provenance", str(tmp_path / "run"), *kit]) == 1
    assert "did not issue: not this project's key" in capsys.readouterr().err
    # ... signature removed: reported as unsigned, and fails when a root CA is given
    del rewritten["signature"]
    (tmp_path / "run" / "provenance.json").write_text(json.dumps(rewritten))
    assert cli_main(["verify-provenance", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "UNSIGNED" in out and "VERIFIED" not in out
    assert provenance.signing_note(tmp_path / "run" / "provenance.json").startswith("UNSIGNED")
    assert cli_main(["verify-provenance", str(tmp_path / "run"), "--root-ca", str(tmp_path / "kit" / "startup" / "rootCA.pem")]) == 1
    assert "NOT VERIFIED" in capsys.readouterr().err
