"""A stand-in for `gcloud` in tests (installed as `gcloud` on PATH by the tests).

It appends its argv (as JSON, one line) to $FAKE_GCLOUD_LOG and answers from the
scenario file $FAKE_GCLOUD_SCENARIO: {"rules": [{"match": [words...], "answers": [
{"rc": 0, "stdout": "...", "stderr": "..."}, ...]}]}. The first rule whose words all
occur in the argv (joined by spaces) answers; its answers are given in order, the last one repeatedly
(the position is kept in $FAKE_GCLOUD_SCENARIO + ".state"). No rule: rc 0, no output.
"""

import json
import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    path = os.environ["FAKE_GCLOUD_SCENARIO"]
    with open(path) as f:
        rules = json.load(f)["rules"]
    state_path = path + ".state"
    used = json.load(open(state_path)) if os.path.exists(state_path) else {}
    joined = " ".join(argv)
    for i, rule in enumerate(rules):
        if all(word in joined for word in rule["match"]):
            n = used.get(str(i), 0)
            answer = rule["answers"][min(n, len(rule["answers"]) - 1)]
            used[str(i)] = n + 1
            with open(state_path, "w") as f:
                json.dump(used, f)
            sys.stdout.write(answer.get("stdout", ""))
            sys.stderr.write(answer.get("stderr", ""))
            return answer.get("rc", 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
