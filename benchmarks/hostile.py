"""A corpus of hostile and broken HTTP requests for `aptp serve` (issue 22).

Every request here must be answered with an OpenAI-shaped JSON 4xx carrying the request id: never a 5xx,
never text/plain. The default suite sends it through the ASGI app (tests/engines/test_server.py) and
`benchmarks.serve_load --only malformed` over a real socket to a running server.

The corpus is built, not listed: every field of a generation request gets the values of the wrong type or
out of range for its kind (string, integer, number, flag), then come the cases the audit found by hand
(a list where a string is expected, a 400-digit integer, JSON nested 20,000 deep, lone surrogates),
broken JSON, bodies over the size cap and wrong content types.
"""

from __future__ import annotations

import json

GEN, ROUTE = "/v1/images/generations", "/v1/route"
JSON_TYPE = {"Content-Type": "application/json"}
HUGE = 10 ** 400  # an integer no float can hold

# values that are wrong for every field of a kind (None is left out: it means "default" for optional fields)
WRONG_STRING = [[], ["x"], {}, {"a": 1}, 0, 7, 1.5, True, False, ""]
WRONG_INTEGER = ["3", "", 2.5, 1e300, True, False, [], [1], {}, -1, HUGE, -HUGE, "9" * 60000]
WRONG_NUMBER = ["7", "", True, [], [7.5], {}, HUGE, -HUGE, -1]
# generation fields by kind, with values wrong for that field alone
STRING_FIELDS = {"model": ["gpt-image-1", "aptp:expert-99", "aptp:expert-x", "aptp:" + "9" * 5000, "APTP"],
                 "size": ["1024x1024", "32", "x" * 5000, "0x0"],
                 "response_format": ["url", "B64_JSON"],
                 "output_format": ["gif", "PNG", "png " * 1000],
                 "scheduler": ["nope", "x" * 5000, "ddim; rm -rf /"]}
INTEGER_FIELDS = {"n": [0, 1000], "steps": [0, 100000], "seed": [2 ** 63], "output_compression": [101, -5]}
NUMBER_FIELDS = {"guidance_scale": [101, 1e30], "guidance_rescale": [1.5, 2]}
PROMPT_VALUES = [None, 5, 1.5, True, [], ["x"], {"a": 1}, "x" * 5000]


def generation_bodies() -> list[dict]:
    """Bodies of /v1/images/generations that are each wrong in one field (or carry an unknown one)."""
    bodies = []
    for field, bad in STRING_FIELDS.items():
        bodies += [{"prompt": "x", field: v} for v in WRONG_STRING + bad]
    for field, bad in INTEGER_FIELDS.items():
        bodies += [{"prompt": "x", field: v} for v in WRONG_INTEGER + bad]
    for field, bad in NUMBER_FIELDS.items():
        bodies += [{"prompt": "x", field: v} for v in WRONG_NUMBER + bad]
    bodies += [{"prompt": v} for v in PROMPT_VALUES] + [{}]
    bodies += [{"prompt": "x", "stream": v} for v in (True, "yes", 1, [1])]
    bodies += [{"prompt": "x", k: 1} for k in ("prompts", "negative_prompt", "x" * 5000, "", "\u00e9")]
    bodies += [{"prompt": "x", "guidance_scale": None, "steps": "3"}, {"prompt": "x", "seed": [1, 2]}]
    return bodies


def route_bodies() -> list[dict]:
    """Bodies of /v1/route that are wrong."""
    return [{"prompt": v} for v in (5, [5], [["x"]], {}, [], "", [""], ["x", None], ["x"] * 65, "x" * 5000,
                                    ["x" * 5000], True, None)] + [{"prompts": "x"}, {"prompt": "x", "n": 1}, {}]


RAW_BODIES = [b'{"prompt": "\\ud800"}', b'{"\\ud800": 1}', b'{"prompt": "a\\udc00b"}', b'{"prompt": ["\\udfff"]}',
              b"[" * 20000 + b"]" * 20000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}",
              b"\xff\xfe", b'{"prompt": "\xff"}', b"", b"null", b"[]", b'"x"', b"1", b"1e999", b"true",
              b'{"prompt": "x",}', b'{"prompt": NaN}', b'{"prompt": "x", "guidance_scale": Infinity}',
              b'{"prompt": "x", "steps": -Infinity}', b"{" * 3, b'{"prompt": "x"', b"\x00" * 64,
              b'{"prompt": "x", "prompt": 5}', b"{'prompt': 'x'}"]


def corpus(max_body_bytes: int = 65536) -> list[tuple[str, bytes, dict]]:
    """(path, body, headers) of hostile or broken POSTs; each must get an OpenAI-shaped JSON 4xx."""
    cases = [(GEN, json.dumps(b).encode(), JSON_TYPE) for b in generation_bodies()]
    cases += [(ROUTE, json.dumps(b).encode(), JSON_TYPE) for b in route_bodies()]
    cases += [(p, b, JSON_TYPE) for p in (GEN, ROUTE) for b in RAW_BODIES]
    over = json.dumps({"prompt": "x" * (max_body_bytes + 10)}).encode()
    cases += [(p, over, JSON_TYPE) for p in (GEN, ROUTE)]
    ok = b'{"prompt": "x"}'
    cases += [(GEN, ok, h) for h in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                                     {"Content-Type": "multipart/form-data; boundary=x"}, {"Content-Type": "json"},
                                     {"Content-Type": "application/jsonx"})]
    cases += [(p, ok, JSON_TYPE) for p in ("/v1/images/edits", "/v1/images/variations", "/%ff", "/v2/route")]
    return cases
