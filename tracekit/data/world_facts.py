"""A small built-in fact set in CounterFact's shape, for running the study offline.

CounterFact itself is never bundled (see ``locate.py``); where it cannot be found, these
hand-written facts let the whole pipeline (known-fact filter, tracing, edit sweeps, the
analyses) run on a real model. They are simple geography facts a small model may know.
Each record has CounterFact's parts: a "{}" prompt, o_true, a counterfactual o_false taken
from the same relation, two paraphrases that start with an unrelated sentence, and
neighbourhood prompts about other subjects with the same true object.
"""

from __future__ import annotations

from tracekit.data.records import FactRecord

# relation -> (prompt, paraphrase templates, {object: [subjects]})
_CITY_COUNTRY = {
    "France": ["Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Nice", "Strasbourg", "Lille"],
    "Italy": ["Rome", "Milan", "Naples", "Venice", "Florence", "Turin", "Bologna", "Palermo"],
    "Germany": ["Berlin", "Munich", "Hamburg", "Frankfurt", "Cologne", "Stuttgart", "Dresden", "Leipzig"],
    "Spain": ["Madrid", "Barcelona", "Seville", "Valencia", "Bilbao", "Malaga", "Granada", "Zaragoza"],
    "Japan": ["Tokyo", "Osaka", "Kyoto", "Yokohama", "Nagoya", "Sapporo", "Hiroshima", "Kobe"],
    "China": ["Beijing", "Shanghai", "Shenzhen", "Guangzhou", "Wuhan", "Chengdu", "Nanjing", "Hangzhou"],
    "Russia": ["Moscow", "Saint Petersburg", "Novosibirsk", "Kazan", "Yekaterinburg", "Vladivostok"],
    "Canada": ["Toronto", "Vancouver", "Montreal", "Ottawa", "Calgary", "Edmonton", "Winnipeg", "Quebec City"],
    "Australia": ["Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Canberra", "Hobart"],
    "India": ["Mumbai", "Delhi", "Bangalore", "Kolkata", "Chennai", "Hyderabad", "Jaipur"],
    "Brazil": ["Rio de Janeiro", "Sao Paulo", "Brasilia", "Salvador", "Recife", "Fortaleza"],
    "Egypt": ["Cairo", "Alexandria", "Luxor", "Aswan", "Giza"],
}
_COUNTRY_LANGUAGE = {
    "Spanish": ["Mexico", "Argentina", "Colombia", "Peru", "Chile", "Venezuela", "Cuba", "Ecuador", "Bolivia"],
    "Portuguese": ["Brazil", "Portugal", "Angola", "Mozambique"],
    "French": ["France", "Senegal", "Monaco"],
    "German": ["Germany", "Austria", "Liechtenstein"],
    "Arabic": ["Egypt", "Saudi Arabia", "Morocco", "Iraq", "Syria", "Jordan", "Algeria", "Tunisia", "Libya"],
    "English": ["Australia", "New Zealand", "Jamaica", "the United Kingdom", "the United States"],
    "Japanese": ["Japan"],
    "Italian": ["Italy", "San Marino"],
    "Russian": ["Russia", "Belarus"],
}
_LANDMARK_CITY = {
    "Paris": ["The Eiffel Tower", "The Louvre", "Notre-Dame Cathedral", "The Arc de Triomphe"],
    "Rome": ["The Colosseum", "The Pantheon", "The Trevi Fountain"],
    "London": ["Big Ben", "The Tower of London", "Buckingham Palace", "Westminster Abbey"],
    "New York": ["The Statue of Liberty", "The Empire State Building", "Central Park", "Times Square"],
    "Moscow": ["The Kremlin", "Red Square", "Saint Basil's Cathedral"],
    "Sydney": ["The Sydney Opera House", "The Sydney Harbour Bridge"],
    "Beijing": ["The Forbidden City", "Tiananmen Square"],
    "Berlin": ["The Brandenburg Gate", "The Reichstag"],
}
_FILLERS = (
    "It was a quiet morning.", "The train was late again.", "She opened the window.",
    "Nobody answered the phone.", "The museum opened at nine.", "Rain fell all afternoon.",
)

RELATIONS = (
    ("city-country", "{} is a city in the country of",
     ("{} is located in the country of", "The city of {} is part of the country of"), _CITY_COUNTRY),
    ("country-language", "The official language of {} is",
     ("In {}, the official language is", "People in {} mostly speak"), _COUNTRY_LANGUAGE),
    ("landmark-city", "{} is located in the city of",
     ("{} can be found in the city of", "To visit {}, you travel to the city of"), _LANDMARK_CITY),
)


def world_facts() -> list[FactRecord]:
    """All built-in facts, in a fixed order, with stable case ids."""
    records: list[FactRecord] = []
    for relation, prompt, paraphrases, table in RELATIONS:
        objects = list(table)
        for o_index, (obj, subjects) in enumerate(table.items()):
            o_false = objects[(o_index + 1) % len(objects)]
            for subject in subjects:
                filler = _FILLERS[len(records) % len(_FILLERS)]
                neighbours = [prompt.format(s) for s in subjects if s != subject][:10]
                records.append(FactRecord(
                    case_id=len(records),
                    prompt=prompt,
                    subject=subject,
                    target_true=" " + obj,
                    target_new=" " + o_false,
                    paraphrase_prompts=tuple(f"{filler} {p.format(subject)}" for p in paraphrases),
                    neighborhood_prompts=tuple(neighbours),
                    relation_id=relation,
                    source="worldfacts",
                ))
    return records
