-- Whether a retrieval arm's answer stands on the expected document: the gateway's "attributions" (the sources
-- whose text holds the answer's sentences, components/attribution.py) name it, whatever the answer cites by [n].
-- Beside source_hit (the answer's own [n] names it), it tells an answer copied from the right source but left
-- uncited from one taken from the wrong source or from none.
ALTER TABLE evaluation_scores ADD COLUMN source_attributed_rate double precision;
ALTER TABLE evaluation_answers ADD COLUMN source_attributed boolean;
