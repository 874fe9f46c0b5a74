"""The method grammar is defined once (common/methods.py): the config's parser, the protocol's check of the
metric keys a node may send, and the adapter variant names agree on every name."""

from __future__ import annotations

import pytest

from common.config import RunConfig
from common.methods import method_name, parse_method, parse_variant
from common.protocol import ALLOWED_PERSONALIZE_METRIC, method_key

VALID = ["base", "oppu", "pag", "rag-k1", "rag-k12", "oppu+rag-k2", "oppu+pag", "rag-k1+pag", "oppu+rag-k3+pag"]
INVALID = ["rag-k0", "rag", "oppu+", "", "OPPU", "oppu+rag-k01", "rag-kx", "lora", "oppu+rag-k1 ", "ref-mean"]


@pytest.mark.parametrize("name", VALID + INVALID)
def test_the_parser_and_the_protocol_accept_the_same_method_names(name: str) -> None:
    try:
        parse_method(name)
        parsed = True
    except ValueError:
        parsed = False
    sendable = ALLOWED_PERSONALIZE_METRIC.fullmatch(method_key(name, "n")) is not None
    assert (parsed, sendable) == ((name in VALID), (name in VALID or name.startswith("ref-")))


@pytest.mark.parametrize(("k", "profile", "name", "variant"), [
    (0, False, "oppu", "k0"), (1, False, "oppu+rag-k1", "k1"), (12, False, "oppu+rag-k12", "k12"),
    (0, True, "oppu+pag", "k0-pag"), (3, True, "oppu+rag-k3+pag", "k3-pag"),
])
def test_a_personal_method_names_its_adapter_variant_and_back(k: int, profile: bool, name: str, variant: str) -> None:
    assert method_name(True, k, profile) == name
    method = parse_method(name)
    assert (method.personal, method.k, method.profile, method.variant) == (True, k, profile, variant)
    assert parse_variant(variant) == method


@pytest.mark.parametrize("variant", ["k", "k01", "0", "k1-rag", "k1-pag-x", "K1", ""])
def test_a_malformed_variant_is_refused_with_the_expected_form(variant: str) -> None:
    with pytest.raises(ValueError, match=r"expected k<N> or k<N>-pag"):
        parse_variant(variant)


def test_the_run_config_resolves_a_bare_rag_to_a_name_of_the_grammar() -> None:
    names = RunConfig(methods="base,rag,oppu+rag,rag-k2,pag", k=3).method_names()
    assert names == ["base", "rag-k3", "oppu+rag-k3", "rag-k2", "pag"]
    assert [method_name(False)] == names[:1] and all(parse_method(n) for n in names)
