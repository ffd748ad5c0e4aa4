"""A small server that answers the part of vLLM's OpenAI-compatible API a served teacher uses, with
a real Hugging Face model saved by the test: GET /v1/models, POST /tokenize and POST /v1/completions
with ``prompt_logprobs`` (each position's top-K ids and log-probs, plus the token there, as vLLM
returns them; a request for more than --max-logprobs is refused with HTTP 400, as vLLM does).

The main test environment has no vLLM; this server lets it run the served-teacher path end to end on
the CPU, against log-probs computed by the same model an in-process teacher loads. The vLLM test
environment runs the real ``vllm serve`` (tests/plugins/samplers/test_vllm.py).

    python tests/served/teacher_server.py --model FOLDER --port PORT [--name NAME] [--max-logprobs K]
        [--tokenizer FOLDER] [--fail-after N]

--fail-after N: from the N-th completion request on, answer HTTP 503 (a server that broke mid-run).
--fault short|twice|missing: a broken answer to every completion request: one log-prob fewer than
asked at the last position (short), the first choice twice in place of the others (twice), or the
sequence's own token left out where it is not in the top-K (missing).
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="teacher")
    ap.add_argument("--max-logprobs", type=int, default=20)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--fail-after", type=int, default=0)
    ap.add_argument("--fault", choices=("short", "twice", "missing"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=True)
    lock = threading.Lock()
    count = [0]

    def logprob_dicts(ids: list[int], k: int) -> list[dict[str, dict[str, float]] | None]:
        with torch.no_grad(), lock:
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        out: list[dict[str, dict[str, float]] | None] = [None]
        for t in range(1, len(ids)):
            row = lp[t - 1]
            order = row.argsort(descending=True)
            entry = {str(int(i)): {"logprob": float(row[i]), "rank": r + 1} for r, i in enumerate(order[:k])}
            rank = int((row > row[ids[t]]).sum()) + 1
            if args.fault != "missing":
                entry.setdefault(str(ids[t]), {"logprob": float(row[ids[t]]), "rank": rank})
            out.append(entry)
        return out

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_a: object) -> None:  # quiet
            pass

        def reply(self, code: int, body: object) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": args.name, "max_model_len": args.max_model_len}]})
            else:
                self.reply(404, {"message": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") not in (None, args.name):
                self.reply(404, {"message": f"The model `{body.get('model')}` does not exist."})
            elif self.path == "/tokenize":
                ids = tok(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
                self.reply(200, {"tokens": ids, "count": len(ids), "max_model_len": args.max_model_len})
            elif self.path == "/v1/completions":
                count[0] += 1
                if args.fail_after and count[0] >= args.fail_after:
                    self.reply(503, {"message": "the engine is down"})
                    return
                k = int(body.get("prompt_logprobs") or 0)
                if k > args.max_logprobs:
                    self.reply(400, {"message": f"Requested prompt logprobs of {k}, which is greater than max "
                                                f"allowed: {args.max_logprobs}"})
                    return
                prompts = body["prompt"]
                prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                choices = [{"index": i, "text": "", "prompt_logprobs": logprob_dicts(p, k)} for i, p in enumerate(prompts)]
                if args.fault == "short":
                    last = choices[-1]["prompt_logprobs"][-1]  # drop the K-th of the top-K
                    last.pop(next(i for i, v in last.items() if v["rank"] == k))
                elif args.fault == "twice":
                    choices = [dict(choices[0], index=0) for _ in choices]
                self.reply(200, {"object": "text_completion", "choices": choices})
            else:
                self.reply(404, {"message": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
