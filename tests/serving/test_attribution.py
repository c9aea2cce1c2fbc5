"""Which retrieved source an answer stands on (the gateway's ``attributions``), whatever the answer cites."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from components.attribution import attribute
from components.prompting import attributed_sources, citations_for, cited_numbers, missing_citation, strip_citations

SOURCES = [
    "Visitors sign in at the north gate. The gate closes at 22:00 every night.",
    "The ferry to Ostby leaves at 07:15 from pier 4 and takes forty minutes.",
    "Pier 4 was rebuilt in 1998 after a storm damaged its timber deck.",
]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # a copied span, with or without the model's own marker, stands on the source that holds it
        ("The ferry to Ostby leaves at 07:15 from pier 4.", [2]),
        ("[3] Pier 4 was rebuilt in 1998.", [3]),
        # two sentences from two sources: both, in the order the answer uses them
        ("The ferry leaves at 07:15 from pier 4. Pier 4 was rebuilt in 1998 after a storm.", [2, 3]),
        # a number no source states: the words match, the fact does not
        ("The ferry to Ostby leaves at 08:25 from pier 4.", []),
        ("Pier 4 was rebuilt in 2001 after a storm.", []),
        # an answer no source holds, a refusal, nothing
        ("The harbour master owns three red boats and a lighthouse.", []),
        ("The sources do not contain the answer, so I do not know.", []),
        ("", []),
    ],
)
def test_attribute_names_the_sources_that_hold_the_answer(answer: str, expected: list[int]) -> None:
    assert attribute(answer, SOURCES) == expected


def test_ties_go_to_the_higher_ranked_source_and_each_source_is_named_once() -> None:
    same = ["The gate closes at 22:00.", "The gate closes at 22:00."]
    assert attribute("The gate closes at 22:00. The gate closes at 22:00 each night.", same) == [1]


CHUNKS = [
    SimpleNamespace(chunk_id=i, document_path=f"d{i}.md", source="s", title=None, heading=None, text=text, score=0.5)
    for i, text in enumerate(SOURCES, 1)
]


def test_attributions_are_entries_of_retrieved() -> None:
    chunks = CHUNKS
    retrieved = citations_for(chunks)
    got = attributed_sources(retrieved, chunks, "Pier 4 was rebuilt in 1998 after a storm damaged it.")
    assert got == [retrieved[2]] and got[0]["document_path"] == "d3.md"


@pytest.mark.parametrize(
    ("answer", "marker"),
    [
        # an answer that cites nothing gets the sources its sentences stand on, in the order it uses them
        ("The ferry to Ostby leaves at 07:15 from pier 4.", " [2]"),
        ("The ferry leaves at 07:15 from pier 4. Pier 4 was rebuilt in 1998 after a storm.", " [2, 3]"),
        # the model's own citation stands, right or wrong: the gateway adds nothing to it
        ("The ferry to Ostby leaves at 07:15 from pier 4 [1].", ""),
        # no source holds it (a wrong number, a refusal): no marker, rather than a citation that misleads
        ("The ferry to Ostby leaves at 08:25 from pier 4.", ""),
        ("The sources do not contain the answer, so I do not know.", ""),
        ("", ""),
    ],
)
def test_the_gateway_cites_only_what_a_source_holds(answer: str, marker: str) -> None:
    retrieved = citations_for(CHUNKS)
    got = missing_citation(retrieved, CHUNKS, answer)
    assert got == marker
    if marker:  # the marker reads back as citations of exactly the attributed sources, and scoring ignores it
        marked = answer + got
        assert cited_numbers(marked, len(retrieved)) == [
            r["index"] for r in attributed_sources(retrieved, CHUNKS, answer)
        ]
        assert strip_citations(marked) == answer
