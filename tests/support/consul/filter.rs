//! A small go-bexpr (`?filter=`, CONNECT.md §10.2) evaluated on an answer's JSON entries:
//! `==`, `!=`, `in`, `not in`, `contains`, `not contains`, `is [not] empty`, `and`, `or`, `not`
//! and parentheses. A selector through a list (`Checks.Status`) matches if any element does.

use serde_json::Value;

/// A parsed filter expression.
#[derive(Debug, Clone)]
pub(super) enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Eq(Vec<String>, String),
    In(Vec<String>, String),
    Empty(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Eq,
    Ne,
    Open,
    Close,
}

/// Parses `src`, refusing selectors whose first segment is not in `roots`. The error is the
/// text after `Failed to create boolean expression evaluator: `.
pub(super) fn parse(src: &str, roots: &[&str]) -> Result<Expr, String> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        pos: 0,
        len: src.len(),
        roots,
    };
    let e = p.or()?;
    if p.pos < p.toks.len() {
        return Err(p.unexpected());
    }
    Ok(e)
}

/// Whether `entry` (one answer element as JSON) matches.
pub(super) fn eval(e: &Expr, entry: &Value) -> bool {
    match e {
        Expr::And(a, b) => eval(a, entry) && eval(b, entry),
        Expr::Or(a, b) => eval(a, entry) || eval(b, entry),
        Expr::Not(a) => !eval(a, entry),
        Expr::Eq(sel, v) => resolve(entry, sel)
            .iter()
            .any(|c| scalar(c).is_some_and(|s| s == *v)),
        Expr::In(sel, v) => resolve(entry, sel).iter().any(|c| match c {
            Value::Array(items) => items.iter().any(|i| scalar(i).is_some_and(|s| s == *v)),
            Value::Object(m) => m.contains_key(v),
            Value::String(s) => s.contains(v.as_str()),
            _ => false,
        }),
        Expr::Empty(sel) => resolve(entry, sel).iter().all(|c| match c {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(m) => m.is_empty(),
            _ => false,
        }),
    }
}

/// The values a selector reaches; lists met before the last segment fan out.
fn resolve<'a>(v: &'a Value, sel: &[String]) -> Vec<&'a Value> {
    let Some((first, rest)) = sel.split_first() else {
        return vec![v];
    };
    match v {
        Value::Array(items) => items.iter().flat_map(|i| resolve(i, sel)).collect(),
        Value::Object(m) => m.get(first).map_or(Vec::new(), |x| resolve(x, rest)),
        _ => Vec::new(),
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `1:<col> (<offset>): <msg>`, go-bexpr's position prefix.
fn at(offset: usize, msg: &str) -> String {
    format!("1:{} ({offset}): {msg}", offset + 1)
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, String> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'(' | b')' => {
                out.push((start, if c == b'(' { Tok::Open } else { Tok::Close }));
                i += 1;
            }
            b'=' | b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push((start, if c == b'=' { Tok::Eq } else { Tok::Ne }));
                i += 2;
            }
            b'"' | b'`' => {
                let end = src[i + 1..]
                    .find(char::from(c))
                    .ok_or_else(|| at(start, "no match found, unterminated string"))?;
                out.push((start, Tok::Str(src[i + 1..i + 1 + end].to_owned())));
                i += end + 2;
            }
            b'0'..=b'9' => {
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                let lit = &src[start..i];
                if lit.matches('.').count() > 1 {
                    return Err(at(start, "rule \"number\": Invalid number literal"));
                }
                out.push((start, Tok::Num(lit.to_owned())));
            }
            c if c.is_ascii_alphabetic() => {
                let mut ident = String::new();
                while i < b.len() {
                    if b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.' {
                        ident.push(char::from(b[i]));
                        i += 1;
                    } else if src[i..].starts_with("[\"") {
                        let end = src[i + 2..]
                            .find("\"]")
                            .ok_or_else(|| at(i, "no match found, expected: \"]\""))?;
                        ident.push('.');
                        ident.push_str(&src[i + 2..i + 2 + end]);
                        i += end + 4;
                    } else {
                        break;
                    }
                }
                out.push((start, Tok::Ident(ident)));
            }
            _ => {
                return Err(at(
                    start,
                    "no match found, expected: \".\", \"[\", [ \\t\\r\\n], [a-zA-Z0-9_] or EOF",
                ))
            }
        }
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
    roots: &'a [&'a str],
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn keyword(&mut self, kw: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Ident(w)) if w == kw) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn unexpected(&self) -> String {
        let offset = self.toks.get(self.pos).map_or(self.len, |(o, _)| *o);
        at(offset, "no match found")
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut e = self.and()?;
        while self.keyword("or") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        while self.keyword("and") {
            e = Expr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Tok::Open) {
            self.pos += 1;
            let e = self.or()?;
            if self.peek() != Some(&Tok::Close) {
                return Err(self.unexpected());
            }
            self.pos += 1;
            return Ok(e);
        }
        self.matcher()
    }

    fn value(&mut self) -> Result<String, String> {
        let v = match self.peek() {
            Some(Tok::Str(s) | Tok::Num(s) | Tok::Ident(s)) => s.clone(),
            _ => return Err(self.unexpected()),
        };
        self.pos += 1;
        Ok(v)
    }

    fn selector(&mut self) -> Result<Vec<String>, String> {
        let (offset, raw) = match self.toks.get(self.pos) {
            Some((o, Tok::Ident(s))) => (*o, s.clone()),
            _ => return Err(self.unexpected()),
        };
        self.pos += 1;
        let sel: Vec<String> = raw.split('.').map(str::to_owned).collect();
        if sel.iter().any(String::is_empty) || !self.roots.contains(&sel[0].as_str()) {
            return Err(at(offset, &format!("Selector {raw:?} is not valid")));
        }
        Ok(sel)
    }

    fn matcher(&mut self) -> Result<Expr, String> {
        // `"v" in Sel` / `"v" not in Sel`: a value first.
        let value_first = match (self.peek(), self.toks.get(self.pos + 1).map(|(_, t)| t)) {
            (Some(Tok::Str(_) | Tok::Num(_)), _) => true,
            (Some(Tok::Ident(_)), Some(Tok::Ident(w))) => w == "in" || w == "not",
            _ => false,
        };
        if value_first {
            let v = self.value()?;
            let negate = self.keyword("not");
            if !self.keyword("in") {
                return Err(self.unexpected());
            }
            let e = Expr::In(self.selector()?, v);
            return Ok(if negate { Expr::Not(Box::new(e)) } else { e });
        }
        let sel = self.selector()?;
        match self.peek().cloned() {
            Some(Tok::Eq) => {
                self.pos += 1;
                Ok(Expr::Eq(sel, self.value()?))
            }
            Some(Tok::Ne) => {
                self.pos += 1;
                Ok(Expr::Not(Box::new(Expr::Eq(sel, self.value()?))))
            }
            _ if self.keyword("is") => {
                let negate = self.keyword("not");
                if !self.keyword("empty") {
                    return Err(self.unexpected());
                }
                let e = Expr::Empty(sel);
                Ok(if negate { Expr::Not(Box::new(e)) } else { e })
            }
            _ => {
                let negate = self.keyword("not");
                if !self.keyword("contains") {
                    return Err(self.unexpected());
                }
                let e = Expr::In(sel, self.value()?);
                Ok(if negate { Expr::Not(Box::new(e)) } else { e })
            }
        }
    }
}
