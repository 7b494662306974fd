# ruff: noqa: E501  (template tables: one fact kind per line reads better than wrapped strings)
"""Spanish templates of the quality set (written for this project; licence: the project's). See lang_en.py."""

VALUES = {
    "city": ["Lisboa", "Oslo", "Viena", "Cracovia", "Oporto", "Edimburgo", "Sevilla", "Múnich", "Lyon", "Dublín",
             "Valencia", "Gante"],
    "job": ["enfermero", "arquitecto", "ingeniero de software", "maestro de primaria", "cocinero", "abogado",
            "farmacéutico", "electricista", "periodista", "contable", "dentista", "conductor de autobús"],
    "species": ["un perro", "un gato", "un loro", "un conejo", "una tortuga", "un hámster"],
    "allergen": ["cacahuetes", "marisco", "penicilina", "picaduras de abeja", "gluten", "leche de vaca",
                 "sésamo", "kiwi"],
    "diet": ["vegetariano", "vegano", "pescetariano", "de dieta baja en carbohidratos", "de dieta baja en sal",
             "halal"],
    "cuisine": ["tailandesa", "italiana", "mexicana", "etíope", "japonesa", "libanesa", "india", "griega"],
    "instrument": ["el piano", "el violín", "la guitarra", "la batería", "el violonchelo", "el saxofón"],
    "subject": ["física", "historia", "economía", "biología", "filosofía", "ingeniería civil", "lingüística",
                "matemáticas"],
    "fear": ["las arañas", "las alturas", "volar", "el agua profunda", "las serpientes", "las tormentas"],
    "commute": ["en bici", "en tren", "a pie", "en autobús", "en coche", "en tranvía"],
    "language": ["inglés", "español", "alemán", "francés", "portugués"],
    "car": ["un Toyota Prius", "un Volkswagen Golf", "un Tesla Model 3", "un Fiat 500", "un Volvo familiar",
            "un Renault Clio"],
    "drink": ["café solo", "té verde", "café con leche de avena", "poleo menta", "un expreso", "chocolate caliente"],
    "sport": ["tenis", "natación", "escalada", "running", "yoga", "fútbol", "ciclismo", "remo"],
    "month": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
              "noviembre", "diciembre"],
}

FACTS = {
    "city": {"fact": "Vivo en {city}.", "again": "Hoy en día mi casa está en {city}.",
             "ask": "¿En qué ciudad vivo?", "para": "¿Dónde tengo mi hogar ahora?",
             "other": "{who} vive en {city}.", "update": "Acabo de mudarme a {city}."},
    "job": {"fact": "Trabajo de {job}.", "again": "Mi profesión: soy {job}.",
            "ask": "¿Cuál es mi trabajo?", "para": "¿A qué me dedico?",
            "other": "{who} trabaja de {job}.", "update": "Cambié de carrera y ahora trabajo de {job}."},
    "pet": {"fact": "Tengo {species} que se llama {name}.", "again": "Mi mascota es {species} llamado {name}.",
            "ask": "¿Cómo se llama mi mascota?", "para": "¿Qué animal vive conmigo?",
            "other": "{who} tiene {species} que se llama {name}."},
    "allergy": {"fact": "Soy alérgico a {allergen}.", "again": "Tengo una alergia grave a {allergen}.",
                "ask": "¿A qué soy alérgico?", "para": "¿Hay algo que me pueda provocar una mala reacción?",
                "other": "{who} es alérgico a {allergen}."},
    "diet": {"fact": "Soy {diet}.", "again": "Llevo años siendo {diet}.",
             "ask": "¿Sigo alguna dieta?", "para": "¿Qué debes tener en cuenta al sugerirme una receta?",
             "other": "{who} es {diet}.", "update": "Ya no soy tan estricto con la comida; ahora soy {diet}."},
    "cuisine": {"fact": "Mi comida favorita es la cocina {cuisine}.", "again": "Me encanta la comida {cuisine} más que ninguna.",
                "ask": "¿Cuál es mi comida favorita?", "para": "¿Qué restaurante me gustaría más para cenar?",
                "other": "A {who} le encanta la comida {cuisine}."},
    "instrument": {"fact": "Toco {instrument}.", "again": "Practico {instrument} desde que era niño.",
                   "ask": "¿Qué instrumento toco?", "para": "¿Qué tipo de música hago yo mismo?",
                   "other": "{who} toca {instrument}."},
    "study": {"fact": "Estudié {subject} en la universidad.", "again": "Mi carrera es de {subject}.",
              "ask": "¿Qué estudié en la universidad?", "para": "¿Cuál es mi formación académica?",
              "other": "{who} estudió {subject} en la universidad."},
    "fear": {"fact": "Me dan miedo {fear}.", "again": "Me aterran {fear}.",
             "ask": "¿A qué le tengo miedo?", "para": "¿Hay algo que me provoque pánico?",
             "other": "A {who} le dan miedo {fear}."},
    "commute": {"fact": "Voy al trabajo {commute}.", "again": "Mi trayecto a la oficina es {commute}.",
                "ask": "¿Cómo voy al trabajo?", "para": "¿Cómo me desplazo a la oficina cada mañana?",
                "other": "{who} va al trabajo {commute}.",
                "update": "Desde que la oficina se mudó voy al trabajo {commute}."},
    "partner": {"fact": "Mi pareja se llama {name}.", "again": "Estoy casado con {name}.",
                "ask": "¿Cómo se llama mi pareja?", "para": "¿Quién es mi cónyuge?",
                "other": "La pareja de {who} se llama {name}."},
    "sister": {"fact": "Mi hermana {name} vive en {city}.", "again": "Mi hermana {name} tiene un piso en {city}.",
               "ask": "¿Dónde vive mi hermana?", "para": "¿En qué localidad puedo visitar a mi familiar?",
               "other": "La hermana de {who} vive en {city}."},
    "birthday": {"fact": "Mi cumpleaños es el {day} de {month}.", "again": "Nací el {day} de {month}.",
                 "ask": "¿Cuándo es mi cumpleaños?", "para": "¿En qué fecha deberías felicitarme?",
                 "other": "El cumpleaños de {who} es el {day} de {month}."},
    "language": {"fact": "Prefiero las respuestas en {language}.", "again": "Respóndeme siempre en {language}, por favor.",
                 "ask": "¿En qué idioma prefiero las respuestas?", "para": "¿Cómo debes hablarme?",
                 "other": "{who} prefiere el {language}."},
    "car": {"fact": "Conduzco {car}.", "again": "Mi coche es {car}.",
            "ask": "¿Qué coche conduzco?", "para": "¿Qué vehículo tengo?",
            "other": "{who} conduce {car}.", "update": "Vendí mi coche viejo y ahora conduzco {car}."},
    "drink": {"fact": "Cada mañana bebo {drink}.", "again": "Empiezo cada día con {drink}.",
              "ask": "¿Qué bebo cada mañana?", "para": "¿Qué deberías ofrecerme en el desayuno?",
              "other": "{who} bebe {drink} cada mañana."},
    "sport": {"fact": "Hago {sport} dos veces por semana.", "again": "Mi deporte es {sport}; entreno dos veces por semana.",
              "ask": "¿Qué deporte practico?", "para": "¿Cómo me mantengo en forma?",
              "other": "{who} hace {sport} los fines de semana."},
}

EVENTS = [
    ("corrí mi primera media maratón", "¿Cuándo corrí una media maratón?"),
    ("me operaron de la rodilla", "¿Cuándo fue mi operación de rodilla?"),
    ("empecé un trabajo nuevo", "¿Cuándo empecé mi trabajo actual?"),
    ("fui a la boda de mi primo en {city}", "¿Cuándo fue la boda de mi primo?"),
    ("aprobé el examen de conducir", "¿Cuándo saqué el carné de conducir?"),
    ("adopté un cachorro de la protectora", "¿Cuándo adopté al cachorro?"),
    ("me rompí la muñeca esquiando", "¿Cuándo me rompí la muñeca?"),
    ("vi a Radiohead en directo en {city}", "¿Cuándo vi a Radiohead en concierto?"),
    ("me mudé a un piso nuevo", "¿Cuándo me cambié de piso?"),
    ("defendí mi tesis doctoral", "¿Cuándo fue la defensa de mi doctorado?"),
]
EVENT = "El {day} de {month} de {year} {event}."
EVENT_OTHER = "El {day} de {month} de {year} {who} tuvo un gran día."
WHEN = "¿Qué hice en {month} de {year}?"
AND = "{first} Y {second}"

WHO = ["Mi compañero Tom", "Mi vecina Sara", "Mi jefa Elena", "Mi amigo Jonás", "Mi primo Ravi",
       "Mi compañera de piso Chloe", "Mi tío Diego", "Mi dentista, el doctor Silva"]
FILLER = "{person} {activity} {place} {time}."
PEOPLE = ["Mi compañero Tom", "Mi vecina Sara", "Mi jefa Elena", "Mi amigo Jonás", "Mi primo Ravi",
          "Mi compañera de piso Chloe", "Mi tío Diego", "Mi sobrina Zoe", "Mi entrenador Kenji",
          "Mi antiguo compañero Viktor"]
ACTIVITIES = ["hace pan de masa madre", "colecciona sellos raros", "cultiva guindillas", "escribe novelas negras",
              "repara relojes mecánicos", "cuida abejas", "pinta pájaros en acuarela", "elabora sidra",
              "construye maquetas de trenes", "canta en un coro de góspel", "teje jerséis de lana",
              "restaura bicicletas viejas"]
PLACES = ["en un garaje", "en un centro cívico", "en un pequeño estudio", "en el jardín", "en el club",
          "en un taller compartido", "en casa", "en el casco antiguo", "junto al lago", "en un cobertizo alquilado"]
TIMES = ["cada domingo por la mañana", "los martes por la tarde", "dos veces al mes", "en las vacaciones de verano",
         "antes del trabajo", "por la noche", "las tardes de lluvia", "cada primavera", "los fines de semana",
         "después de clase"]

FOLLOWUPS = [
    ("pet", "¿Y qué tipo de animal es?", "pet"),
    ("allergy", "¿Es grave?", "allergy"),
    ("instrument", "¿Desde cuándo lo toco?", "instrument"),
    ("sport", "¿Con qué frecuencia lo hago?", "sport"),
    ("drink", "¿Caliente o frío?", "drink"),
    ("partner", "Recuérdame, ¿estamos casados?", "partner"),
    ("city", "¿Y mi hermana?", "sister"),
    ("allergy", "¿Y qué hay de mi dieta?", "diet"),
    ("job", "¿Y qué estudié?", "study"),
]
REPLY = "Esto es lo que recuerdo sobre eso."
