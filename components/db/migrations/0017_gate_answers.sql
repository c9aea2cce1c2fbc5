-- Answers the gate got from a model, kept so a later gate that asks the same model the same prompt with the same
-- sampling reuses them instead of asking vLLM again (components/training/answer_cache.py). The key is a digest
-- of the model's identity (served name and the weights it stands for), the whole prompt (which holds the
-- retrieved sources, so a changed index changes it) and the sampling. Rows unused for a while are dropped.
CREATE TABLE gate_answers (
    key        text PRIMARY KEY CHECK (key ~ '^[0-9a-f]{64}$'),
    model      text NOT NULL,
    answer     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    used_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gate_answers_used_at ON gate_answers (used_at);
