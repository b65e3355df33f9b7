"""Tasks and class names of the papers' datasets, in label order."""

SMILE = ("not smiling", "smiling")                                   # GENKI-4K
FER_EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # FER-2013 0..6
GENDER = ("female", "male")                                          # IMDB-WIKI gender 0 / 1
RAF_EMOTIONS = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")  # RAF-DB 1..7
RAF_GENDER = ("male", "female", "unsure")
RAF_RACE = ("caucasian", "african-american", "asian")
RAF_AGE = ("0-3", "4-19", "20-39", "40-69", "70+")

# Paper 1 (Sang & Cuong 2018): smile, emotion, gender.
PAPER1_TASKS = {"smile": SMILE, "emotion": FER_EMOTIONS, "gender": GENDER}
# Paper 2 (Saroop et al. 2021): emotion, gender, race, age on RAF-DB.
PAPER2_TASKS = {"emotion": RAF_EMOTIONS, "gender": RAF_GENDER, "race": RAF_RACE, "age": RAF_AGE}
