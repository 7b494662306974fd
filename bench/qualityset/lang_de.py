# ruff: noqa: E501  (template tables: one fact kind per line reads better than wrapped strings)
"""German templates of the quality set (written for this project; licence: the project's). See lang_en.py."""

VALUES = {
    "city": ["Lissabon", "Oslo", "Wien", "Krakau", "Porto", "Edinburgh", "Sevilla", "München", "Lyon", "Dublin",
             "Valencia", "Gent"],
    "job": ["Krankenpfleger", "Architekt", "Softwareentwickler", "Grundschullehrer", "Koch", "Anwalt", "Apotheker",
            "Elektriker", "Journalist", "Buchhalter", "Zahnarzt", "Busfahrer"],
    "species": ["einen Hund", "eine Katze", "einen Papagei", "ein Kaninchen", "eine Schildkröte", "einen Hamster"],
    "allergen": ["Erdnüsse", "Meeresfrüchte", "Penicillin", "Bienenstiche", "Gluten", "Kuhmilch", "Sesam", "Kiwi"],
    "diet": ["Vegetarier", "Veganer", "Pescetarier", "auf Low-Carb-Diät", "auf salzarmer Diät", "Halal-Esser"],
    "cuisine": ["thailändische", "italienische", "mexikanische", "äthiopische", "japanische", "libanesische",
                "indische", "griechische"],
    "instrument": ["Klavier", "Geige", "Gitarre", "Schlagzeug", "Cello", "Saxofon"],
    "subject": ["Physik", "Geschichte", "Wirtschaft", "Biologie", "Philosophie", "Bauingenieurwesen",
                "Linguistik", "Mathematik"],
    "fear": ["Spinnen", "Höhen", "Fliegen", "tiefem Wasser", "Schlangen", "Gewittern"],
    "commute": ["mit dem Fahrrad", "mit dem Zug", "zu Fuß", "mit dem Bus", "mit dem Auto", "mit der Straßenbahn"],
    "language": ["Englisch", "Spanisch", "Deutsch", "Französisch", "Portugiesisch"],
    "car": ["einen Toyota Prius", "einen Volkswagen Golf", "einen Tesla Model 3", "einen Fiat 500",
            "einen Volvo Kombi", "einen Renault Clio"],
    "drink": ["schwarzen Kaffee", "grünen Tee", "Hafermilch-Latte", "Pfefferminztee", "Espresso", "heiße Schokolade"],
    "sport": ["Tennis", "Schwimmen", "Klettern", "Laufen", "Yoga", "Fußball", "Radfahren", "Rudern"],
    "month": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
              "November", "Dezember"],
}

FACTS = {
    "city": {"fact": "Ich wohne in {city}.", "again": "Mein Zuhause ist zurzeit in {city}.",
             "ask": "In welcher Stadt wohne ich?", "para": "Wo bin ich derzeit daheim?",
             "other": "{who} wohnt in {city}.", "update": "Ich bin gerade nach {city} gezogen."},
    "job": {"fact": "Ich arbeite als {job}.", "again": "Mein Beruf: ich bin {job}.",
            "ask": "Was ist mein Beruf?", "para": "Womit verdiene ich meinen Lebensunterhalt?",
            "other": "{who} arbeitet als {job}.", "update": "Ich habe umgeschult und arbeite jetzt als {job}."},
    "pet": {"fact": "Ich habe {species} namens {name}.", "again": "Mein Haustier ist {species}, es heißt {name}.",
            "ask": "Wie heißt mein Haustier?", "para": "Welches Tier lebt bei mir?",
            "other": "{who} hat {species} namens {name}."},
    "allergy": {"fact": "Ich bin allergisch gegen {allergen}.", "again": "Ich habe eine schwere Allergie gegen {allergen}.",
                "ask": "Wogegen bin ich allergisch?", "para": "Gibt es etwas, das bei mir eine schlimme Reaktion auslöst?",
                "other": "{who} ist allergisch gegen {allergen}."},
    "diet": {"fact": "Ich bin {diet}.", "again": "Ich bin seit Jahren {diet}.",
             "ask": "Halte ich eine Diät ein?", "para": "Worauf musst du achten, wenn du mir ein Rezept vorschlägst?",
             "other": "{who} ist {diet}.", "update": "Beim Essen bin ich nicht mehr so streng; jetzt bin ich {diet}."},
    "cuisine": {"fact": "Mein Lieblingsessen ist die {cuisine} Küche.", "again": "Ich liebe die {cuisine} Küche mehr als jede andere.",
                "ask": "Was ist mein Lieblingsessen?", "para": "Welches Restaurant würde mir zum Abendessen am besten gefallen?",
                "other": "{who} liebt die {cuisine} Küche."},
    "instrument": {"fact": "Ich spiele {instrument}.", "again": "Ich übe {instrument}, seit ich ein Kind war.",
                   "ask": "Welches Instrument spiele ich?", "para": "Welche Art von Musik mache ich selbst?",
                   "other": "{who} spielt {instrument}."},
    "study": {"fact": "Ich habe an der Universität {subject} studiert.", "again": "Mein Abschluss ist in {subject}.",
              "ask": "Was habe ich an der Universität studiert?", "para": "Welchen akademischen Hintergrund habe ich?",
              "other": "{who} hat an der Universität {subject} studiert."},
    "fear": {"fact": "Ich habe Angst vor {fear}.", "again": "Vor {fear} fürchte ich mich sehr.",
             "ask": "Wovor habe ich Angst?", "para": "Gibt es etwas, das mich in Panik versetzt?",
             "other": "{who} hat Angst vor {fear}."},
    "commute": {"fact": "Ich fahre {commute} zur Arbeit.", "again": "Mein Arbeitsweg ins Büro ist {commute}.",
                "ask": "Wie komme ich zur Arbeit?", "para": "Wie gelange ich jeden Morgen ins Büro?",
                "other": "{who} fährt {commute} zur Arbeit.",
                "update": "Seit das Büro umgezogen ist, fahre ich {commute} zur Arbeit."},
    "partner": {"fact": "Mein Partner heißt {name}.", "again": "Ich bin mit {name} verheiratet.",
                "ask": "Wie heißt mein Partner?", "para": "Wer ist mein Ehepartner?",
                "other": "Der Partner von {who} heißt {name}."},
    "sister": {"fact": "Meine Schwester {name} wohnt in {city}.", "again": "Meine Schwester {name} hat eine Wohnung in {city}.",
               "ask": "Wo wohnt meine Schwester?", "para": "In welchem Ort kann ich meine Geschwister besuchen?",
               "other": "Die Schwester von {who} wohnt in {city}."},
    "birthday": {"fact": "Mein Geburtstag ist am {day}. {month}.", "again": "Ich bin am {day}. {month} geboren.",
                 "ask": "Wann ist mein Geburtstag?", "para": "An welchem Datum solltest du mir gratulieren?",
                 "other": "{who} hat am {day}. {month} Geburtstag."},
    "language": {"fact": "Ich möchte Antworten auf {language}.", "again": "Antworte mir bitte immer auf {language}.",
                 "ask": "In welcher Sprache möchte ich Antworten?", "para": "Wie sollst du mit mir reden?",
                 "other": "{who} spricht am liebsten {language}."},
    "car": {"fact": "Ich fahre {car}.", "again": "Mein Auto ist {car}.",
            "ask": "Welches Auto fahre ich?", "para": "Welches Fahrzeug besitze ich?",
            "other": "{who} fährt {car}.", "update": "Ich habe mein altes Auto verkauft und fahre jetzt {car}."},
    "drink": {"fact": "Jeden Morgen trinke ich {drink}.", "again": "Ich beginne jeden Tag mit {drink}.",
              "ask": "Was trinke ich jeden Morgen?", "para": "Was solltest du mir zum Frühstück anbieten?",
              "other": "{who} trinkt jeden Morgen {drink}."},
    "sport": {"fact": "Ich mache zweimal pro Woche {sport}.", "again": "Mein Sport ist {sport}; ich trainiere zweimal pro Woche.",
              "ask": "Welchen Sport mache ich?", "para": "Wie halte ich mich fit?",
              "other": "{who} macht am Wochenende {sport}."},
}

EVENTS = [
    ("bin ich meinen ersten Halbmarathon gelaufen", "Wann bin ich einen Halbmarathon gelaufen?"),
    ("wurde ich am Knie operiert", "Wann war meine Knieoperation?"),
    ("habe ich eine neue Stelle angefangen", "Wann habe ich meine jetzige Stelle angefangen?"),
    ("war ich auf der Hochzeit meines Cousins in {city}", "Wann war die Hochzeit meines Cousins?"),
    ("habe ich die Führerscheinprüfung bestanden", "Wann habe ich den Führerschein gemacht?"),
    ("habe ich einen Welpen aus dem Tierheim adoptiert", "Wann habe ich den Welpen adoptiert?"),
    ("habe ich mir beim Skifahren das Handgelenk gebrochen", "Wann habe ich mir das Handgelenk gebrochen?"),
    ("habe ich Radiohead live in {city} gesehen", "Wann habe ich Radiohead im Konzert gesehen?"),
    ("bin ich in eine neue Wohnung gezogen", "Wann bin ich umgezogen?"),
    ("habe ich meine Doktorarbeit verteidigt", "Wann war meine Promotionsverteidigung?"),
]
EVENT = "Am {day}. {month} {year} {event}."
EVENT_OTHER = "Am {day}. {month} {year} hatte {who} einen großen Tag."
WHEN = "Was habe ich im {month} {year} gemacht?"
AND = "{first} Und {second}"

WHO = ["Mein Kollege Tom", "Meine Nachbarin Sara", "Meine Chefin Elena", "Mein Freund Jonas", "Mein Cousin Ravi",
       "Meine Mitbewohnerin Chloe", "Mein Onkel Diego", "Mein Zahnarzt Dr. Silva"]
FILLER = "{person} {activity} {place} {time}."
PEOPLE = ["Mein Kollege Tom", "Meine Nachbarin Sara", "Meine Chefin Elena", "Mein Freund Jonas", "Mein Cousin Ravi",
          "Meine Mitbewohnerin Chloe", "Mein Onkel Diego", "Meine Nichte Zoe", "Mein Trainer Kenji",
          "Mein alter Mitbewohner Viktor"]
ACTIVITIES = ["backt Sauerteigbrot", "sammelt seltene Briefmarken", "züchtet Chilischoten", "schreibt Krimis",
              "repariert mechanische Uhren", "hält Honigbienen", "malt Vögel in Aquarell", "braut Apfelwein",
              "baut Modelleisenbahnen", "singt in einem Gospelchor", "strickt Wollpullover",
              "restauriert alte Fahrräder"]
PLACES = ["in einer Garage", "im Gemeindezentrum", "in einem kleinen Atelier", "im Garten", "im Verein",
          "in einer Gemeinschaftswerkstatt", "zu Hause", "in der Altstadt", "am See", "in einem gemieteten Schuppen"]
TIMES = ["jeden Sonntagmorgen", "dienstagabends", "zweimal im Monat", "in den Sommerferien", "vor der Arbeit",
         "spät in der Nacht", "an verregneten Nachmittagen", "jeden Frühling", "am Wochenende", "nach der Schule"]

FOLLOWUPS = [
    ("pet", "Und was für ein Tier ist es?", "pet"),
    ("allergy", "Wie schlimm ist das?", "allergy"),
    ("instrument", "Seit wann spiele ich es?", "instrument"),
    ("sport", "Wie oft mache ich das?", "sport"),
    ("drink", "Heiß oder kalt?", "drink"),
    ("partner", "Erinnere mich: sind wir verheiratet?", "partner"),
    ("city", "Und meine Schwester?", "sister"),
    ("allergy", "Und wie ist es mit meiner Ernährung?", "diet"),
    ("job", "Und was habe ich studiert?", "study"),
]
REPLY = "Das ist, was ich darüber weiß."
