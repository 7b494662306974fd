# ruff: noqa: E501  (template tables: one fact kind per line reads better than wrapped strings)
"""English templates of the quality set (written for this project; licence: the project's).

Every language module holds the same keys with lists aligned by index, so a fact written in one language can be
asked about in another. `{slot}` names a key of VALUES (or `who`, `name`, `day`, `month`, `year`).
"""

VALUES = {
    "city": ["Lisbon", "Oslo", "Vienna", "Krakow", "Porto", "Edinburgh", "Seville", "Munich", "Lyon", "Dublin",
             "Valencia", "Ghent"],
    "job": ["a nurse", "an architect", "a software engineer", "a primary school teacher", "a chef", "a lawyer",
            "a pharmacist", "an electrician", "a journalist", "an accountant", "a dentist", "a bus driver"],
    "species": ["a dog", "a cat", "a parrot", "a rabbit", "a tortoise", "a hamster"],
    "allergen": ["peanuts", "shellfish", "penicillin", "bee stings", "gluten", "cow's milk", "sesame", "kiwi"],
    "diet": ["vegetarian", "vegan", "pescatarian", "on a low-carb diet", "on a low-salt diet", "halal"],
    "cuisine": ["Thai", "Italian", "Mexican", "Ethiopian", "Japanese", "Lebanese", "Indian", "Greek"],
    "instrument": ["the piano", "the violin", "the guitar", "the drums", "the cello", "the saxophone"],
    "subject": ["physics", "history", "economics", "biology", "philosophy", "civil engineering", "linguistics",
                "mathematics"],
    "fear": ["spiders", "heights", "flying", "deep water", "snakes", "thunderstorms"],
    "commute": ["by bike", "by train", "on foot", "by bus", "by car", "by tram"],
    "language": ["English", "Spanish", "German", "French", "Portuguese"],
    "car": ["a Toyota Prius", "a Volkswagen Golf", "a Tesla Model 3", "a Fiat 500", "a Volvo estate",
            "a Renault Clio"],
    "drink": ["black coffee", "green tea", "oat milk lattes", "peppermint tea", "espresso", "hot chocolate"],
    "sport": ["tennis", "swimming", "rock climbing", "running", "yoga", "football", "cycling", "rowing"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"],
}

FACTS = {
    "city": {"fact": "I live in {city}.", "again": "These days my home is in {city}.",
             "ask": "Which city do I live in?", "para": "Where is my home these days?",
             "other": "{who} lives in {city}.", "update": "I have just moved to {city}."},
    "job": {"fact": "I work as {job}.", "again": "My job: I am {job}.",
            "ask": "What is my job?", "para": "What do I do for a living?",
            "other": "{who} works as {job}.", "update": "I changed careers and now work as {job}."},
    "pet": {"fact": "I have {species} called {name}.", "again": "My pet is {species} named {name}.",
            "ask": "What is my pet called?", "para": "What animal lives with me?",
            "other": "{who} has {species} called {name}."},
    "allergy": {"fact": "I am allergic to {allergen}.", "again": "I have a serious allergy to {allergen}.",
                "ask": "What am I allergic to?", "para": "Is there anything that could give me a bad reaction?",
                "other": "{who} is allergic to {allergen}."},
    "diet": {"fact": "I am {diet}.", "again": "I have been {diet} for years.",
             "ask": "Do I follow any diet?", "para": "What should you keep in mind when suggesting a recipe for me?",
             "other": "{who} is {diet}.", "update": "I am no longer strict about food; now I am {diet}."},
    "cuisine": {"fact": "My favourite food is {cuisine} cooking.", "again": "I love {cuisine} food more than any other.",
                "ask": "What is my favourite food?", "para": "Which restaurant would I most enjoy for dinner?",
                "other": "{who} loves {cuisine} food."},
    "instrument": {"fact": "I play {instrument}.", "again": "I have been practising {instrument} since I was a child.",
                   "ask": "Which instrument do I play?", "para": "What kind of music do I make myself?",
                   "other": "{who} plays {instrument}."},
    "study": {"fact": "I studied {subject} at university.", "again": "My degree is in {subject}.",
              "ask": "What did I study at university?", "para": "What is my academic background?",
              "other": "{who} studied {subject} at university."},
    "fear": {"fact": "I am afraid of {fear}.", "again": "I am terrified of {fear}.",
             "ask": "What am I afraid of?", "para": "Is there something that makes me panic?",
             "other": "{who} is afraid of {fear}."},
    "commute": {"fact": "I go to work {commute}.", "again": "My commute to the office is {commute}.",
                "ask": "How do I get to work?", "para": "How do I travel to the office each morning?",
                "other": "{who} goes to work {commute}.", "update": "Since the office moved I go to work {commute}."},
    "partner": {"fact": "My partner is called {name}.", "again": "I am married to {name}.",
                "ask": "What is my partner's name?", "para": "Who is my spouse?",
                "other": "{who}'s partner is called {name}."},
    "sister": {"fact": "My sister {name} lives in {city}.", "again": "My sister {name} has a flat in {city}.",
               "ask": "Where does my sister live?", "para": "In which town can I visit my sibling?",
               "other": "{who}'s sister lives in {city}."},
    "birthday": {"fact": "My birthday is on {day} {month}.", "again": "I was born on {day} {month}.",
                 "ask": "When is my birthday?", "para": "On which date should you congratulate me?",
                 "other": "{who}'s birthday is on {day} {month}."},
    "language": {"fact": "I prefer answers in {language}.", "again": "Please always reply to me in {language}.",
                 "ask": "In which language do I prefer answers?", "para": "How should you talk to me?",
                 "other": "{who} prefers {language}."},
    "car": {"fact": "I drive {car}.", "again": "My car is {car}.",
            "ask": "What car do I drive?", "para": "Which vehicle do I own?",
            "other": "{who} drives {car}.", "update": "I sold my old car and now drive {car}."},
    "drink": {"fact": "Every morning I drink {drink}.", "again": "I start each day with {drink}.",
              "ask": "What do I drink every morning?", "para": "What should you offer me at breakfast?",
              "other": "{who} drinks {drink} every morning."},
    "sport": {"fact": "I do {sport} twice a week.", "again": "My sport is {sport}; I train twice a week.",
              "ask": "Which sport do I do?", "para": "How do I keep fit?",
              "other": "{who} does {sport} at weekends."},
}

# (what happened, as the user tells it; the question that asks when)
EVENTS = [
    ("I ran my first half marathon", "When did I run a half marathon?"),
    ("I had knee surgery", "When was my knee operation?"),
    ("I started a new job", "When did I start my current job?"),
    ("I went to my cousin's wedding in {city}", "When was my cousin's wedding?"),
    ("I passed my driving test", "When did I get my driving licence?"),
    ("I adopted a puppy from the shelter", "When did I adopt the puppy?"),
    ("I broke my wrist skiing", "When did I break my wrist?"),
    ("I saw Radiohead live in {city}", "When did I see Radiohead in concert?"),
    ("I moved into a new flat", "When did I move flats?"),
    ("I defended my PhD thesis", "When was my PhD defence?"),
]
EVENT = "On {day} {month} {year} {event}."
EVENT_OTHER = "On {day} {month} {year} {who} had a big day."
WHEN = "What did I do in {month} {year}?"
AND = "{first} And {second}"

WHO = ["My colleague Tom", "My neighbour Sara", "My boss Elena", "My friend Jonas", "My cousin Ravi",
       "My flatmate Chloe", "My uncle Diego", "My dentist Dr Silva"]
FILLER = "{person} {activity} {place} {time}."
PEOPLE = ["My colleague Tom", "My neighbour Sara", "My boss Elena", "My friend Jonas", "My cousin Ravi",
          "My flatmate Chloe", "My uncle Diego", "My niece Zoe", "My coach Kenji", "My old roommate Viktor"]
ACTIVITIES = ["bakes sourdough bread", "collects rare stamps", "grows chilli peppers", "writes crime novels",
              "repairs mechanical watches", "keeps honey bees", "paints watercolour birds", "brews cider",
              "builds model railways", "sings in a gospel choir", "knits wool jumpers", "restores old bicycles"]
PLACES = ["in a garage", "at a community centre", "in a small studio", "in the garden", "at the club",
          "in a shared workshop", "at home", "in the old town", "by the lake", "in a rented shed"]
TIMES = ["every Sunday morning", "on Tuesday evenings", "twice a month", "during the summer holidays",
         "before work", "late at night", "on rainy afternoons", "each spring", "at weekends", "after school"]

# Follow-ups in a conversation: (the kind asked about just before, what the user says next, the kind it is about).
FOLLOWUPS = [
    ("pet", "And what kind of animal is it?", "pet"),
    ("allergy", "How serious is it?", "allergy"),
    ("instrument", "How long have I been playing it?", "instrument"),
    ("sport", "How often do I do that?", "sport"),
    ("drink", "Hot or cold?", "drink"),
    ("partner", "Remind me, are we married?", "partner"),
    ("city", "And my sister?", "sister"),
    ("allergy", "And what about my diet?", "diet"),
    ("job", "And what did I study?", "study"),
]
REPLY = "Here is what I remember about that."
