/* tokenizer.cc — the engine's only C++: a thin extern "C" shim over libsentencepiece.
 *
 * Owns lt_tokenizer (the SentencePieceProcessor, a copy of every piece, its type, and the
 * table of special pieces matched literally by tok_encode_special). Piece types are read from
 * the model proto's wire bytes (the installed library ships no protobuf header): ModelProto
 * field 1 = repeated SentencePiece {1: piece, 2: score, 3: type}. No exception escapes: every
 * entry point catches and turns failures into lt_status + message.
 */
#include "cuda/text/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda/base/tensor.h"

struct lt_tokenizer {
    sentencepiece::SentencePieceProcessor sp;
    std::string path;
    std::vector<std::string> pieces;
    std::vector<float> scores;
    std::vector<int> types;
    std::unordered_map<std::string, int> special; /* control + user-defined pieces */
    std::vector<size_t> special_lens;             /* distinct lengths, longest first */
    bool special_first[256];                      /* first bytes of special pieces */
};

/* ---- a minimal protobuf reader for ModelProto.pieces[].type ------------------------------ */

static bool read_varint(const unsigned char *&p, const unsigned char *end, uint64_t &v) {
    v = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
        unsigned char b = *p++;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

static bool skip_field(const unsigned char *&p, const unsigned char *end, int wire) {
    uint64_t v;
    switch (wire) {
    case 0:
        return read_varint(p, end, v);
    case 1:
        if (end - p < 8) return false;
        p += 8;
        return true;
    case 2:
        if (!read_varint(p, end, v) || (uint64_t)(end - p) < v) return false;
        p += v;
        return true;
    case 5:
        if (end - p < 4) return false;
        p += 4;
        return true;
    default:
        return false;
    }
}

/* Fills types[i] for each piece in order; false when the bytes are not a ModelProto. */
static bool proto_piece_types(const std::string &bytes, std::vector<int> &types) {
    const unsigned char *p = (const unsigned char *)bytes.data(), *end = p + bytes.size();
    types.clear();
    while (p < end) {
        uint64_t key;
        if (!read_varint(p, end, key)) return false;
        int field = (int)(key >> 3), wire = (int)(key & 7);
        if (field == 1 && wire == 2) {
            uint64_t len;
            if (!read_varint(p, end, len) || (uint64_t)(end - p) < len) return false;
            const unsigned char *q = p, *qend = p + len;
            int type = 1; /* NORMAL is the default */
            while (q < qend) {
                uint64_t k2;
                if (!read_varint(q, qend, k2)) return false;
                if ((k2 >> 3) == 3 && (k2 & 7) == 0) {
                    uint64_t t;
                    if (!read_varint(q, qend, t)) return false;
                    type = (int)t;
                } else if (!skip_field(q, qend, (int)(k2 & 7))) {
                    return false;
                }
            }
            types.push_back(type);
            p = qend;
        } else if (!skip_field(p, end, wire)) {
            return false;
        }
    }
    return true;
}

/* ---- C API ------------------------------------------------------------------------------- */

extern "C" lt_status tok_load(lt_tokenizer **out, const char *path, char *err) {
    *out = nullptr;
    lt_tokenizer *t = new (std::nothrow) lt_tokenizer();
    if (!t) {
        return lt_fail(err, LT_ERR_MEMORY, "%s: out of memory", path);
    }
    try {
        FILE *f = fopen(path, "rb");
        if (!f) {
            lt_fail(err, LT_ERR_IO, "%s: cannot open the SentencePiece tokenizer model", path);
            delete t;
            return LT_ERR_IO;
        }
        fclose(f);
        auto st = t->sp.Load(path);
        if (!st.ok()) {
            lt_fail(err, LT_ERR_FORMAT, "%s: not a SentencePiece model (%s)", path,
                    st.ToString().c_str());
            delete t;
            return LT_ERR_FORMAT;
        }
        t->path = path;
        int n = t->sp.GetPieceSize();
        std::string proto = t->sp.serialized_model_proto();
        if (!proto_piece_types(proto, t->types) || (int)t->types.size() != n) {
            lt_fail(err, LT_ERR_FORMAT, "%s: could not read piece types from the model proto",
                    path);
            delete t;
            return LT_ERR_FORMAT;
        }
        t->pieces.resize((size_t)n);
        t->scores.resize((size_t)n);
        memset(t->special_first, 0, sizeof t->special_first);
        /* SentencePiece loads a model whose pieces repeat a string or hold a NUL byte; ids and
         * text would then disagree, so such a model is refused */
        std::unordered_map<std::string, int> by_piece;
        by_piece.reserve((size_t)n);
        for (int i = 0; i < n; i++) {
            t->pieces[(size_t)i] = t->sp.IdToPiece(i);
            if (t->pieces[(size_t)i].find('\0') != std::string::npos) {
                /* the C API hands pieces out as C strings (GGUF export, special matching) */
                lt_fail(err, LT_ERR_FORMAT,
                        "%s: piece %d holds a NUL byte: not a valid SentencePiece model", path, i);
                delete t;
                return LT_ERR_FORMAT;
            }
            auto dup = by_piece.emplace(t->pieces[(size_t)i], i);
            if (!dup.second) {
                lt_fail(err, LT_ERR_FORMAT,
                        "%s: pieces %d and %d are both '%.40s': not a valid SentencePiece model",
                        path, dup.first->second, i, t->pieces[(size_t)i].c_str());
                delete t;
                return LT_ERR_FORMAT;
            }
            t->scores[(size_t)i] = t->sp.GetScore(i);
            int ty = t->types[(size_t)i];
            if ((ty == TOK_CONTROL || ty == TOK_USER_DEFINED) && !t->pieces[(size_t)i].empty()) {
                const std::string &s = t->pieces[(size_t)i];
                t->special.emplace(s, i);
                t->special_first[(unsigned char)s[0]] = true;
                bool seen = false;
                for (size_t L : t->special_lens)
                    seen |= L == s.size();
                if (!seen) t->special_lens.push_back(s.size());
            }
        }
        std::sort(t->special_lens.begin(), t->special_lens.end(), std::greater<size_t>());
    } catch (const std::exception &e) {
        lt_fail(err, LT_ERR_FORMAT, "%s: %s", path, e.what());
        delete t;
        return LT_ERR_FORMAT;
    }
    *out = t;
    return LT_OK;
}

extern "C" void tok_free(lt_tokenizer *t) {
    delete t;
}

extern "C" const char *tok_path(const lt_tokenizer *t) {
    return t->path.c_str();
}

static lt_status ids_out(const std::vector<int> &v, int32_t **ids, int *n, char *err) {
    *ids = (int32_t *)malloc(sizeof(int32_t) * (v.size() + 1));
    if (!*ids) {
        return lt_fail(err, LT_ERR_MEMORY, "tokenizer: out of memory");
    }
    for (size_t i = 0; i < v.size(); i++)
        (*ids)[i] = v[i];
    *n = (int)v.size();
    return LT_OK;
}

static bool sp_encode(const lt_tokenizer *t, const char *s, size_t len, std::vector<int> &out,
                      char *err) {
    std::vector<int> part;
    auto st = t->sp.Encode(absl::string_view(s, len), &part);
    if (!st.ok()) {
        lt_fail(err, LT_ERR_ARG, "tokenizer: %s", st.ToString().c_str());
        return false;
    }
    out.insert(out.end(), part.begin(), part.end());
    return true;
}

extern "C" lt_status tok_encode(const lt_tokenizer *t, const char *text, int32_t **ids, int *n,
                                char *err) {
    try {
        std::vector<int> v;
        if (!sp_encode(t, text, strlen(text), v, err)) return LT_ERR_ARG;
        return ids_out(v, ids, n, err);
    } catch (const std::exception &e) {
        return lt_fail(err, LT_ERR_MEMORY, "tokenizer: %s", e.what());
    }
}

extern "C" lt_status tok_encode_special(const lt_tokenizer *t, const char *text, int32_t **ids,
                                        int *n, char *err) {
    try {
        std::vector<int> v;
        size_t len = strlen(text), start = 0, i = 0;
        while (i < len) {
            int hit = -1;
            size_t hit_len = 0;
            if (t->special_first[(unsigned char)text[i]]) {
                for (size_t L : t->special_lens) { /* longest match first */
                    if (i + L > len) continue;
                    auto it = t->special.find(std::string(text + i, L));
                    if (it != t->special.end()) {
                        hit = it->second;
                        hit_len = L;
                        break;
                    }
                }
            }
            if (hit < 0) {
                i++;
                continue;
            }
            if (i > start && !sp_encode(t, text + start, i - start, v, err)) return LT_ERR_ARG;
            v.push_back(hit);
            i += hit_len;
            start = i;
        }
        if (len > start && !sp_encode(t, text + start, len - start, v, err)) return LT_ERR_ARG;
        return ids_out(v, ids, n, err);
    } catch (const std::exception &e) {
        return lt_fail(err, LT_ERR_MEMORY, "tokenizer: %s", e.what());
    }
}

extern "C" lt_status tok_decode(const lt_tokenizer *t, const int32_t *ids, int n, char **text,
                                char *err) {
    try {
        std::vector<int> v;
        int size = (int)t->pieces.size();
        for (int i = 0; i < n; i++)
            if (ids[i] >= 0 && ids[i] < size) v.push_back(ids[i]);
        std::string s;
        auto st = t->sp.Decode(v, &s);
        if (!st.ok()) {
            return lt_fail(err, LT_ERR_ARG, "tokenizer: %s", st.ToString().c_str());
        }
        *text = (char *)malloc(s.size() + 1);
        if (!*text) {
            return lt_fail(err, LT_ERR_MEMORY, "tokenizer: out of memory");
        }
        memcpy(*text, s.data(), s.size());
        (*text)[s.size()] = 0;
        return LT_OK;
    } catch (const std::exception &e) {
        return lt_fail(err, LT_ERR_MEMORY, "tokenizer: %s", e.what());
    }
}

extern "C" int tok_piece_bytes(const lt_tokenizer *t, int32_t id, char *buf, int cap) {
    if (id < 0 || id >= (int32_t)t->pieces.size() || cap <= 0) return 0;
    int ty = t->types[(size_t)id];
    const std::string &p = t->pieces[(size_t)id];
    if (ty == TOK_CONTROL || ty == TOK_UNUSED) return 0;
    if (ty == TOK_UNKNOWN) {
        static const char unk[] = " \xE2\x81\x87 "; /* SentencePiece's surface for <unk> */
        int k = (int)sizeof unk - 1 < cap ? (int)sizeof unk - 1 : cap;
        memcpy(buf, unk, (size_t)k);
        return k;
    }
    if (ty == TOK_BYTE) { /* "<0xNN>" */
        unsigned v = 0;
        if (p.size() == 6 && sscanf(p.c_str(), "<0x%2X>", &v) == 1) {
            buf[0] = (char)v;
            return 1;
        }
        return 0;
    }
    int k = 0;
    for (size_t i = 0; i < p.size() && k < cap;) {
        if (i + 2 < p.size() && (unsigned char)p[i] == 0xE2 && (unsigned char)p[i + 1] == 0x96 &&
            (unsigned char)p[i + 2] == 0x81) {
            buf[k++] = ' ';
            i += 3;
        } else {
            buf[k++] = p[i++];
        }
    }
    return k;
}

extern "C" int tok_piece_to_id(const lt_tokenizer *t, const char *piece) {
    int id = t->sp.PieceToId(piece);
    if (id < 0 || id >= (int)t->pieces.size() || t->pieces[(size_t)id] != piece) return -1;
    return id;
}

extern "C" int tok_size(const lt_tokenizer *t) {
    return (int)t->pieces.size();
}

extern "C" const char *tok_piece(const lt_tokenizer *t, int id) {
    if (id < 0 || id >= (int)t->pieces.size()) return "";
    return t->pieces[(size_t)id].c_str();
}

extern "C" float tok_score(const lt_tokenizer *t, int id) {
    if (id < 0 || id >= (int)t->scores.size()) return 0.0f;
    return t->scores[(size_t)id];
}

extern "C" int tok_type(const lt_tokenizer *t, int id) {
    if (id < 0 || id >= (int)t->types.size()) return 0;
    return t->types[(size_t)id];
}

extern "C" int tok_bos_id(const lt_tokenizer *t) {
    return t->sp.bos_id();
}
extern "C" int tok_eos_id(const lt_tokenizer *t) {
    return t->sp.eos_id();
}
extern "C" int tok_pad_id(const lt_tokenizer *t) {
    return t->sp.pad_id();
}
extern "C" int tok_unk_id(const lt_tokenizer *t) {
    return t->sp.unk_id();
}
