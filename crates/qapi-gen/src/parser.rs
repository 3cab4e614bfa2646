//! Parser for QEMU's QAPI schema dialect.
//!
//! A schema file is a sequence of top-level expressions written in a
//! JSON-like syntax: objects, arrays, single-quoted strings and the keywords
//! `true` and `false`. `#` starts a comment that runs to the end of the line.
//! A block of comment lines opened and closed by a line holding only `##`
//! is a doc comment and attaches to the expression that follows it.
//!
//! The parser reads the text directly (no quote rewriting and re-parsing),
//! keeps the order of object members, and records the line of every
//! expression so that later errors can point at the definition.

use std::path::{Path, PathBuf};

use crate::Error;

/// A value in a schema expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A single-quoted string.
    Str(String),
    /// `true` or `false`.
    Bool(bool),
    /// An array.
    List(Vec<Expr>),
    /// An object, members in source order.
    Dict(Vec<(String, Expr)>),
}

impl Expr {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Expr::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The members, if this is an object.
    pub fn as_dict(&self) -> Option<&[(String, Expr)]> {
        match self {
            Expr::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// Looks up a member of an object.
    pub fn get(&self, key: &str) -> Option<&Expr> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// A doc comment block, split into its parts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Doc {
    /// The symbol the block documents (`@Name:` on its first line), if any.
    pub symbol: Option<String>,
    /// The free text describing the definition, with sections such as
    /// `Returns:` and `Since:` kept as written.
    pub body: String,
    /// Descriptions of members, arguments and enum values, by name.
    pub members: Vec<(String, String)>,
}

impl Doc {
    /// The description of a member, if the block has one.
    pub fn member(&self, name: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_str())
    }
}

/// One top-level expression with where it came from.
#[derive(Debug, Clone)]
pub struct TopLevel {
    /// The expression (an object).
    pub expr: Expr,
    /// The doc comment right before it, if any.
    pub doc: Option<Doc>,
    /// The file it was read from.
    pub file: PathBuf,
    /// The line it starts on (1-based).
    pub line: usize,
}

/// Reads a schema file and, recursively, every file it includes.
///
/// Includes are resolved relative to the including file; a file included
/// twice is read once, as QEMU does.
pub fn parse_file(path: &Path) -> Result<Vec<TopLevel>, Error> {
    let mut out = Vec::new();
    let mut seen = Vec::new();
    parse_into(path, &mut out, &mut seen, 0)?;
    Ok(out)
}

fn parse_into(
    path: &Path,
    out: &mut Vec<TopLevel>,
    seen: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<(), Error> {
    if depth > 32 {
        return Err(Error::at(path, 0, "includes nest deeper than 32 levels"));
    }
    let canonical = path
        .canonicalize()
        .map_err(|e| Error::at(path, 0, format!("cannot open: {e}")))?;
    if seen.contains(&canonical) {
        return Ok(());
    }
    seen.push(canonical);
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::at(path, 0, format!("cannot read: {e}")))?;
    for top in parse_str(&text, path)? {
        if let Some(inc) = top.expr.get("include") {
            let Some(name) = inc.as_str() else {
                return Err(Error::at(path, top.line, "'include' wants a string"));
            };
            let dir = path.parent().unwrap_or_else(|| Path::new("."));
            parse_into(&dir.join(name), out, seen, depth + 1)?;
        } else {
            out.push(top);
        }
    }
    Ok(())
}

/// Parses the text of one schema file (includes are returned as expressions).
pub fn parse_str(text: &str, file: &Path) -> Result<Vec<TopLevel>, Error> {
    Parser {
        src: text.as_bytes(),
        pos: 0,
        line: 1,
        file,
        pending_doc: None,
    }
    .parse_all()
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
    file: &'a Path,
    pending_doc: Option<Doc>,
}

impl Parser<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::at(self.file, self.line, msg)
    }

    fn parse_all(mut self) -> Result<Vec<TopLevel>, Error> {
        let mut out = Vec::new();
        loop {
            self.skip_space(true)?;
            if self.pos >= self.src.len() {
                return Ok(out);
            }
            let line = self.line;
            let doc = self.pending_doc.take();
            let expr = self.value(0)?;
            if !matches!(expr, Expr::Dict(_)) {
                return Err(Error::at(
                    self.file,
                    line,
                    "top-level expression must be an object",
                ));
            }
            out.push(TopLevel {
                expr,
                doc,
                file: self.file.to_path_buf(),
                line,
            });
        }
    }

    /// Skips white space and comments. At the top level, collects doc blocks.
    fn skip_space(&mut self, top: bool) -> Result<(), Error> {
        while self.pos < self.src.len() {
            match self.src[self.pos] {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    let at_line_start = self.pos == 0 || self.src[self.pos - 1] == b'\n';
                    let line = self.rest_of_line();
                    if top && at_line_start && line.trim_end() == "##" {
                        self.doc_block()?;
                    } else {
                        self.skip_line();
                    }
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn rest_of_line(&self) -> &str {
        let end = self.src[self.pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.src.len(), |p| self.pos + p);
        std::str::from_utf8(&self.src[self.pos..end]).unwrap_or("")
    }

    fn skip_line(&mut self) {
        while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
            self.pos += 1;
        }
    }

    /// Reads a doc block: the opening `##` line, `#` lines, the closing `##` line.
    fn doc_block(&mut self) -> Result<(), Error> {
        let start_line = self.line;
        self.skip_line();
        let mut lines = Vec::new();
        loop {
            if self.pos >= self.src.len() {
                return Err(Error::at(self.file, start_line, "unterminated doc comment"));
            }
            // Consume the newline that ends the previous line.
            self.pos += 1;
            self.line += 1;
            let line = self.rest_of_line().to_owned();
            let trimmed = line.trim_end();
            if trimmed == "##" {
                self.skip_line();
                break;
            }
            let Some(text) = trimmed.strip_prefix('#') else {
                return Err(self.err("doc comment line must start with '#'"));
            };
            let text = text.strip_prefix(' ').unwrap_or(text);
            lines.push(text.to_owned());
            self.skip_line();
        }
        self.pending_doc = Some(parse_doc(&lines));
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Expr, Error> {
        if depth > 64 {
            return Err(self.err("expression nests too deeply"));
        }
        self.skip_space(false)?;
        match self.src.get(self.pos) {
            Some(b'{') => {
                self.pos += 1;
                let mut members: Vec<(String, Expr)> = Vec::new();
                self.skip_space(false)?;
                if self.eat(b'}') {
                    return Ok(Expr::Dict(members));
                }
                loop {
                    self.skip_space(false)?;
                    let key = match self.value(depth + 1)? {
                        Expr::Str(s) => s,
                        _ => return Err(self.err("object keys must be strings")),
                    };
                    if members.iter().any(|(k, _)| *k == key) {
                        return Err(self.err(format!("duplicate key '{key}'")));
                    }
                    self.skip_space(false)?;
                    if !self.eat(b':') {
                        return Err(self.err("expected ':'"));
                    }
                    let v = self.value(depth + 1)?;
                    members.push((key, v));
                    self.skip_space(false)?;
                    if self.eat(b'}') {
                        return Ok(Expr::Dict(members));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("expected ',' or '}'"));
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.skip_space(false)?;
                if self.eat(b']') {
                    return Ok(Expr::List(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.skip_space(false)?;
                    if self.eat(b']') {
                        return Ok(Expr::List(items));
                    }
                    if !self.eat(b',') {
                        return Err(self.err("expected ',' or ']'"));
                    }
                }
            }
            Some(b'\'') => self.string(),
            Some(_) if self.src[self.pos..].starts_with(b"true") => {
                self.pos += 4;
                Ok(Expr::Bool(true))
            }
            Some(_) if self.src[self.pos..].starts_with(b"false") => {
                self.pos += 5;
                Ok(Expr::Bool(false))
            }
            Some(&c) => Err(self.err(format!("stray '{}'", c as char))),
            None => Err(self.err("expected a value, found the end of the file")),
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.src.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn string(&mut self) -> Result<Expr, Error> {
        self.pos += 1;
        let mut s = Vec::new();
        loop {
            match self.src.get(self.pos) {
                None | Some(b'\n') => return Err(self.err("missing terminating \"'\"")),
                Some(b'\'') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    // QAPI allows only `\\`, `\'` and `\"` style escapes of the next char.
                    match self.src.get(self.pos + 1) {
                        Some(&c @ (b'\\' | b'\'' | b'"' | b'/')) => s.push(c),
                        _ => return Err(self.err("unknown escape in string")),
                    }
                    self.pos += 2;
                }
                Some(&c) => {
                    s.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(s)
            .map(Expr::Str)
            .map_err(|_| self.err("string is not valid UTF-8"))
    }
}

/// Splits the lines of a doc block into symbol, body and member descriptions.
fn parse_doc(lines: &[String]) -> Doc {
    let mut doc = Doc::default();
    let mut rest = lines;
    if let Some(first) = lines.first() {
        if let Some(sym) = first.strip_prefix('@').and_then(|s| s.strip_suffix(':')) {
            doc.symbol = Some(sym.to_owned());
            rest = &lines[1..];
        }
    }
    let mut body: Vec<&str> = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in rest {
        let member = line.strip_prefix('@').and_then(|l| {
            let (name, text) = l.split_once(':')?;
            (!name.contains(' ')).then(|| (name.to_owned(), text.trim().to_owned()))
        });
        if let Some((name, text)) = member {
            if let Some((n, t)) = current.take() {
                doc.members.push((n, t.join(" ")));
            }
            current = Some((name, vec![text]));
            continue;
        }
        let is_section = [
            "Returns:",
            "Since:",
            "Example:",
            "Examples:",
            "Note:",
            "Notes:",
            "Features:",
            "Errors:",
        ]
        .iter()
        .any(|s| line.starts_with(s));
        match &mut current {
            Some((_, text)) if !is_section && !line.trim().is_empty() && line.starts_with(' ') => {
                text.push(line.trim().to_owned());
            }
            _ => {
                if let Some((n, t)) = current.take() {
                    doc.members.push((n, t.join(" ")));
                }
                body.push(line);
            }
        }
    }
    if let Some((n, t)) = current.take() {
        doc.members.push((n, t.join(" ")));
    }
    doc.body = body.join("\n").trim().to_owned();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<TopLevel> {
        parse_str(text, Path::new("test.json")).unwrap()
    }

    #[test]
    fn parses_expressions_comments_and_docs() {
        let tops = parse(
            "# a comment\n\
             ##\n\
             # @Foo:\n\
             #\n\
             # A foo.\n\
             #\n\
             # @a: the a member,\n\
             #     continued\n\
             # @b: the b member\n\
             #\n\
             # Since: 1.0\n\
             ##\n\
             { 'struct': 'Foo', # trailing comment\n\
               'data': { 'a': 'int', '*b': ['str'] } }\n\
             { 'enum': 'E', 'data': [ 'x', { 'name': 'y' } ] }\n",
        );
        assert_eq!(tops.len(), 2);
        let doc = tops[0].doc.as_ref().unwrap();
        assert_eq!(doc.symbol.as_deref(), Some("Foo"));
        assert_eq!(doc.member("a"), Some("the a member, continued"));
        assert_eq!(doc.member("b"), Some("the b member"));
        assert!(doc.body.contains("A foo."));
        assert!(doc.body.contains("Since: 1.0"));
        assert_eq!(tops[0].line, 13);
        assert_eq!(
            tops[0].expr.get("data").unwrap().get("*b"),
            Some(&Expr::List(vec![Expr::Str("str".into())]))
        );
        assert!(tops[1].doc.is_none());
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            "{ 'a': 'b' ",
            "{ 'a' 'b' }",
            "{ 'a': 'b', 'a': 'c' }",
            "[ 'x' ]",
            "{ 'a': 'unterminated }",
            "{ 'a': \"double\" }",
            "##\n# @X:\n",
        ] {
            assert!(parse_str(bad, Path::new("t")).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = format!("{{ 'a': {}'x'{} }}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_str(&text, Path::new("t")).is_err());
    }
}
