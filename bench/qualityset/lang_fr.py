# ruff: noqa: E501  (template tables: one fact kind per line reads better than wrapped strings)
"""French templates of the quality set (written for this project; licence: the project's). See lang_en.py."""

VALUES = {
    "city": ["Lisbonne", "Oslo", "Vienne", "Cracovie", "Porto", "Édimbourg", "Séville", "Munich", "Lyon", "Dublin",
             "Valence", "Gand"],
    "job": ["infirmier", "architecte", "ingénieur logiciel", "professeur des écoles", "cuisinier", "avocat",
            "pharmacien", "électricien", "journaliste", "comptable", "dentiste", "chauffeur de bus"],
    "species": ["un chien", "un chat", "un perroquet", "un lapin", "une tortue", "un hamster"],
    "allergen": ["aux cacahuètes", "aux fruits de mer", "à la pénicilline", "aux piqûres d'abeille", "au gluten",
                 "au lait de vache", "au sésame", "au kiwi"],
    "diet": ["végétarien", "végan", "pescétarien", "au régime pauvre en glucides", "au régime sans sel", "halal"],
    "cuisine": ["thaïlandaise", "italienne", "mexicaine", "éthiopienne", "japonaise", "libanaise", "indienne",
                "grecque"],
    "instrument": ["du piano", "du violon", "de la guitare", "de la batterie", "du violoncelle", "du saxophone"],
    "subject": ["la physique", "l'histoire", "l'économie", "la biologie", "la philosophie", "le génie civil",
                "la linguistique", "les mathématiques"],
    "fear": ["des araignées", "du vide", "de l'avion", "de l'eau profonde", "des serpents", "des orages"],
    "commute": ["à vélo", "en train", "à pied", "en bus", "en voiture", "en tram"],
    "language": ["anglais", "espagnol", "allemand", "français", "portugais"],
    "car": ["une Toyota Prius", "une Volkswagen Golf", "une Tesla Model 3", "une Fiat 500", "un break Volvo",
            "une Renault Clio"],
    "drink": ["un café noir", "du thé vert", "un latte au lait d'avoine", "une infusion de menthe", "un expresso",
              "un chocolat chaud"],
    "sport": ["du tennis", "de la natation", "de l'escalade", "de la course à pied", "du yoga", "du football",
              "du vélo", "de l'aviron"],
    "month": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
              "novembre", "décembre"],
}

FACTS = {
    "city": {"fact": "J'habite à {city}.", "again": "En ce moment, mon chez-moi est à {city}.",
             "ask": "Dans quelle ville est-ce que j'habite ?", "para": "Où se trouve mon foyer actuellement ?",
             "other": "{who} habite à {city}.", "update": "Je viens de déménager à {city}."},
    "job": {"fact": "Je travaille comme {job}.", "again": "Mon métier : je suis {job}.",
            "ask": "Quel est mon travail ?", "para": "Comment est-ce que je gagne ma vie ?",
            "other": "{who} travaille comme {job}.", "update": "J'ai changé de carrière et je travaille maintenant comme {job}."},
    "pet": {"fact": "J'ai {species} qui s'appelle {name}.", "again": "Mon animal de compagnie est {species} nommé {name}.",
            "ask": "Comment s'appelle mon animal de compagnie ?", "para": "Quelle bête vit avec moi ?",
            "other": "{who} a {species} qui s'appelle {name}."},
    "allergy": {"fact": "Je suis allergique {allergen}.", "again": "J'ai une allergie grave {allergen}.",
                "ask": "À quoi suis-je allergique ?", "para": "Y a-t-il quelque chose qui pourrait me rendre malade ?",
                "other": "{who} est allergique {allergen}."},
    "diet": {"fact": "Je suis {diet}.", "again": "Je suis {diet} depuis des années.",
             "ask": "Est-ce que je suis un régime ?", "para": "À quoi dois-tu faire attention en me proposant une recette ?",
             "other": "{who} est {diet}.", "update": "Je ne suis plus aussi strict avec la nourriture ; maintenant je suis {diet}."},
    "cuisine": {"fact": "Ma cuisine préférée est la cuisine {cuisine}.", "again": "J'adore la nourriture {cuisine} plus que toute autre.",
                "ask": "Quelle est ma cuisine préférée ?", "para": "Quel restaurant me plairait le plus pour le dîner ?",
                "other": "{who} adore la cuisine {cuisine}."},
    "instrument": {"fact": "Je joue {instrument}.", "again": "Je pratique {instrument} depuis que je suis enfant.",
                   "ask": "De quel instrument est-ce que je joue ?", "para": "Quel genre de musique est-ce que je fais moi-même ?",
                   "other": "{who} joue {instrument}."},
    "study": {"fact": "J'ai étudié {subject} à l'université.", "again": "Mon diplôme porte sur {subject}.",
              "ask": "Qu'ai-je étudié à l'université ?", "para": "Quelle est ma formation académique ?",
              "other": "{who} a étudié {subject} à l'université."},
    "fear": {"fact": "J'ai peur {fear}.", "again": "Je suis terrifié {fear}.",
             "ask": "De quoi ai-je peur ?", "para": "Y a-t-il quelque chose qui me fait paniquer ?",
             "other": "{who} a peur {fear}."},
    "commute": {"fact": "Je vais au travail {commute}.", "again": "Mon trajet jusqu'au bureau se fait {commute}.",
                "ask": "Comment est-ce que je vais au travail ?", "para": "Comment je me rends au bureau chaque matin ?",
                "other": "{who} va au travail {commute}.",
                "update": "Depuis que le bureau a déménagé, je vais au travail {commute}."},
    "partner": {"fact": "Mon conjoint s'appelle {name}.", "again": "Je suis marié avec {name}.",
                "ask": "Comment s'appelle mon conjoint ?", "para": "Qui est mon époux ?",
                "other": "Le conjoint de {who} s'appelle {name}."},
    "sister": {"fact": "Ma sœur {name} habite à {city}.", "again": "Ma sœur {name} a un appartement à {city}.",
               "ask": "Où habite ma sœur ?", "para": "Dans quelle localité puis-je rendre visite à ma famille proche ?",
               "other": "La sœur de {who} habite à {city}."},
    "birthday": {"fact": "Mon anniversaire est le {day} {month}.", "again": "Je suis né le {day} {month}.",
                 "ask": "Quand est mon anniversaire ?", "para": "À quelle date devrais-tu me féliciter ?",
                 "other": "L'anniversaire de {who} est le {day} {month}."},
    "language": {"fact": "Je préfère les réponses en {language}.", "again": "Réponds-moi toujours en {language}, s'il te plaît.",
                 "ask": "Dans quelle langue est-ce que je préfère les réponses ?", "para": "Comment dois-tu me parler ?",
                 "other": "{who} préfère l'{language}."},
    "car": {"fact": "Je conduis {car}.", "again": "Ma voiture est {car}.",
            "ask": "Quelle voiture est-ce que je conduis ?", "para": "Quel véhicule est-ce que je possède ?",
            "other": "{who} conduit {car}.", "update": "J'ai vendu ma vieille voiture et je conduis maintenant {car}."},
    "drink": {"fact": "Chaque matin je bois {drink}.", "again": "Je commence chaque journée avec {drink}.",
              "ask": "Qu'est-ce que je bois chaque matin ?", "para": "Que devrais-tu m'offrir au petit-déjeuner ?",
              "other": "{who} boit {drink} chaque matin."},
    "sport": {"fact": "Je fais {sport} deux fois par semaine.", "again": "Mon sport, c'est {sport} ; je m'entraîne deux fois par semaine.",
              "ask": "Quel sport est-ce que je pratique ?", "para": "Comment est-ce que je garde la forme ?",
              "other": "{who} fait {sport} le week-end."},
}

EVENTS = [
    ("j'ai couru mon premier semi-marathon", "Quand ai-je couru un semi-marathon ?"),
    ("je me suis fait opérer du genou", "Quand a eu lieu mon opération du genou ?"),
    ("j'ai commencé un nouveau travail", "Quand ai-je commencé mon travail actuel ?"),
    ("je suis allé au mariage de mon cousin à {city}", "Quand a eu lieu le mariage de mon cousin ?"),
    ("j'ai réussi mon permis de conduire", "Quand ai-je eu mon permis de conduire ?"),
    ("j'ai adopté un chiot au refuge", "Quand ai-je adopté le chiot ?"),
    ("je me suis cassé le poignet au ski", "Quand me suis-je cassé le poignet ?"),
    ("j'ai vu Radiohead en concert à {city}", "Quand ai-je vu Radiohead en concert ?"),
    ("j'ai emménagé dans un nouvel appartement", "Quand ai-je déménagé ?"),
    ("j'ai soutenu ma thèse de doctorat", "Quand a eu lieu ma soutenance de thèse ?"),
]
EVENT = "Le {day} {month} {year}, {event}."
EVENT_OTHER = "Le {day} {month} {year}, {who} a vécu un grand jour."
WHEN = "Qu'est-ce que j'ai fait en {month} {year} ?"
AND = "{first} Et {second}"

WHO = ["Mon collègue Tom", "Ma voisine Sara", "Ma cheffe Elena", "Mon ami Jonas", "Mon cousin Ravi",
       "Ma colocataire Chloé", "Mon oncle Diego", "Mon dentiste, le docteur Silva"]
FILLER = "{person} {activity} {place} {time}."
PEOPLE = ["Mon collègue Tom", "Ma voisine Sara", "Ma cheffe Elena", "Mon ami Jonas", "Mon cousin Ravi",
          "Ma colocataire Chloé", "Mon oncle Diego", "Ma nièce Zoé", "Mon entraîneur Kenji",
          "Mon ancien colocataire Viktor"]
ACTIVITIES = ["fait du pain au levain", "collectionne des timbres rares", "cultive des piments",
              "écrit des romans policiers", "répare des montres mécaniques", "élève des abeilles",
              "peint des oiseaux à l'aquarelle", "brasse du cidre", "construit des trains miniatures",
              "chante dans une chorale gospel", "tricote des pulls en laine", "restaure de vieux vélos"]
PLACES = ["dans un garage", "au centre social", "dans un petit atelier", "dans le jardin", "au club",
          "dans un atelier partagé", "à la maison", "dans la vieille ville", "au bord du lac", "dans un cabanon loué"]
TIMES = ["chaque dimanche matin", "le mardi soir", "deux fois par mois", "pendant les vacances d'été",
         "avant le travail", "tard le soir", "les après-midi pluvieux", "chaque printemps", "le week-end",
         "après l'école"]

FOLLOWUPS = [
    ("pet", "Et c'est quel genre d'animal ?", "pet"),
    ("allergy", "C'est grave ?", "allergy"),
    ("instrument", "Depuis quand j'en joue ?", "instrument"),
    ("sport", "À quelle fréquence je le fais ?", "sport"),
    ("drink", "Chaud ou froid ?", "drink"),
    ("partner", "Rappelle-moi, on est mariés ?", "partner"),
    ("city", "Et ma sœur ?", "sister"),
    ("allergy", "Et pour mon régime ?", "diet"),
    ("job", "Et qu'est-ce que j'ai étudié ?", "study"),
]
REPLY = "Voici ce dont je me souviens à ce sujet."
