"""An LLM critic reply that lists every error of its step (`errors`), over real HTTP against the fake server."""
import json

from opsd_critic.fake_server import Reply
from opsd_critic.validate import problem
from tests.critic.test_llm import GOOD, _run

TWO = json.dumps({"verdict": "error", "step": 2, "quote": '"Oslo"', "hint": "Use celsius or fahrenheit for the unit.",
                  "category": "wrong_value", "errors": [{"quote": '"kelvin"', "category": "enum_violation"},
                                                        {"quote": '"Oslo"', "category": "wrong_value"}]})


def test_several_errors_become_one_critique_in_text_order(server, llm_critic, samples):
    traj = samples["weather-enum"]
    srv = server([Reply(TWO)])
    c = _run(llm_critic(srv), traj)
    assert c.verdict == "error" and [e["quote"] for e in c.errors] == ['"Oslo"', '"kelvin"']
    assert c.quote_at == c.errors[0]["quote_at"] < c.errors[1]["quote_at"] and problem(c, traj) is None
    assert "errors" in srv.requests[0]["response_format"]["json_schema"]["schema"]["anyOf"][0]["properties"]


def test_errors_that_do_not_start_at_the_quote_are_reasked(server, llm_critic, samples):
    bad = json.loads(TWO) | {"quote": '"kelvin"'}  # "Oslo" comes first in the message
    srv = server([Reply(json.dumps(bad)), Reply(GOOD)])
    c = _run(llm_critic(srv), samples["weather-enum"])
    assert c.verdict == "error" and c.errors is None and "errors must start" in srv.requests[1]["messages"][-1]["content"]


def test_an_error_quote_not_in_the_step_is_reasked(server, llm_critic, samples):
    bad = json.loads(TWO)
    bad["errors"][0]["quote"] = '"Bergen"'
    srv = server([Reply(json.dumps(bad)), Reply(GOOD)])
    c = _run(llm_critic(srv), samples["weather-enum"])
    assert c.verdict == "error" and "errors[0]" in srv.requests[1]["messages"][-1]["content"]
