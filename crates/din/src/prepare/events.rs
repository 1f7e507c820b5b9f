//! Raw behaviour logs: a general delimited log with named columns, the
//! Amazon review table and Taobao UserBehavior presets, and MovieLens.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// One behaviour from a raw log. Ids are kept as the raw strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Raw user id.
    pub user: String,
    /// Raw item id.
    pub item: String,
    /// Raw category of the item.
    pub category: String,
    /// Seconds (any monotone unit works; gaps are read as seconds).
    pub time: i64,
    /// Behaviour type (e.g. Taobao's pv/cart/fav/buy).
    pub behavior: Option<String>,
    /// A numeric label or rating, for the rating protocol.
    pub value: Option<f32>,
    /// Per-user profile fields (MovieLens: age, gender, occupation), in [`Log::profile_fields`] order.
    pub profile: Vec<String>,
    /// 1-based line in the source file (ties in time keep file order).
    pub line: u64,
}

/// A delimited behaviour log and which columns hold what.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSpec {
    /// The file.
    pub path: PathBuf,
    /// Field delimiter.
    pub delimiter: u8,
    /// Whether the first line names the columns; otherwise `columns` does.
    pub header: bool,
    /// Column names in file order when there is no header.
    pub columns: Vec<String>,
    /// User column.
    pub user: String,
    /// Item column.
    pub item: String,
    /// Category column (absent: every item is its own category "0").
    pub category: Option<String>,
    /// Timestamp column (integer seconds).
    pub time: String,
    /// Behaviour-type column.
    pub behavior: Option<String>,
    /// Label or rating column.
    pub value: Option<String>,
}

impl LogSpec {
    /// A comma-separated log with a header, naming its user, item, category
    /// and time columns (no behaviour type, no rating).
    pub fn csv(path: PathBuf, user: &str, item: &str, category: &str, time: &str) -> Self {
        LogSpec {
            path,
            delimiter: b',',
            header: true,
            columns: Vec::new(),
            user: user.into(),
            item: item.into(),
            category: Some(category.into()),
            time: time.into(),
            behavior: None,
            value: None,
        }
    }

    /// The DIN paper's Amazon review table as torch-rechub ships it:
    /// header `user_id,item_id,time,cate_id`.
    pub fn amazon(path: PathBuf) -> Self {
        LogSpec {
            path,
            delimiter: b',',
            header: true,
            columns: Vec::new(),
            user: "user_id".into(),
            item: "item_id".into(),
            category: Some("cate_id".into()),
            time: "time".into(),
            behavior: None,
            value: None,
        }
    }

    /// Taobao UserBehavior: no header, `user,item,category,behavior,timestamp`.
    pub fn taobao(path: PathBuf) -> Self {
        LogSpec {
            path,
            delimiter: b',',
            header: false,
            columns: ["user", "item", "category", "behavior", "timestamp"]
                .map(String::from)
                .to_vec(),
            user: "user".into(),
            item: "item".into(),
            category: Some("category".into()),
            time: "timestamp".into(),
            behavior: Some("behavior".into()),
            value: None,
        }
    }
}

/// Events read from a source, with the rows that were skipped.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// The events, in file order.
    pub events: Vec<Event>,
    /// Names of the per-user profile fields carried by [`Event::profile`].
    pub profile_fields: Vec<String>,
    /// Malformed rows skipped under `skip_bad_rows` (file, line, reason).
    pub skipped: Vec<String>,
}

/// Records a malformed row: an error, or a skip when `skip` is set.
fn reject(log: &mut Log, skip: bool, err: Error) -> Result<()> {
    if skip {
        log.skipped.push(err.to_string());
        Ok(())
    } else {
        Err(err)
    }
}

fn parse_error(path: &Path, line: u64, column: &str, value: &str, reason: &str) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        line,
        column: column.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Reads a delimited log. Malformed rows (wrong column count, empty ids,
/// non-integer time, non-numeric value) are errors naming file, line, column
/// and value, or are skipped and counted when `skip_bad_rows` is set.
pub fn read_log(spec: &LogSpec, skip_bad_rows: bool) -> Result<Log> {
    let path = &spec.path;
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open log", e))?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(spec.delimiter)
        .has_headers(spec.header)
        .flexible(true)
        .from_reader(BufReader::new(file));
    let columns: Vec<String> = if spec.header {
        let h = reader.headers().map_err(|e| Error::Csv {
            path: path.clone(),
            line: 1,
            message: e.to_string(),
        })?;
        h.iter().map(|c| c.trim().to_string()).collect()
    } else {
        spec.columns.clone()
    };
    // Every missing column at once, with the role it was named for.
    let mut missing: Vec<(&'static str, String)> = Vec::new();
    let mut find = |role: &'static str, name: Option<&str>| -> Option<usize> {
        let name = name?;
        let at = columns.iter().position(|c| c == name);
        if at.is_none() {
            missing.push((role, name.to_string()));
        }
        at
    };
    let user = find("user", Some(&spec.user));
    let item = find("item", Some(&spec.item));
    let category = find("category", spec.category.as_deref());
    let time = find("time", Some(&spec.time));
    let behavior = find("behavior", spec.behavior.as_deref());
    let value = find("label", spec.value.as_deref());
    if !missing.is_empty() {
        return Err(Error::MissingLogColumns {
            path: path.clone(),
            missing,
            header: columns.join(","),
        });
    }
    let (user, item, time) = (user.unwrap_or(0), item.unwrap_or(0), time.unwrap_or(0));

    let mut log = Log::default();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                reject(
                    &mut log,
                    skip_bad_rows,
                    Error::Csv {
                        path: path.clone(),
                        line,
                        message: e.to_string(),
                    },
                )?;
                continue;
            }
        }
        let line = record.position().map_or(0, |p| p.line());
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        if record.len() != columns.len() {
            let err = Error::RowLength {
                path: path.clone(),
                line,
                expected: columns.len(),
                found: record.len(),
            };
            reject(&mut log, skip_bad_rows, err)?;
            continue;
        }
        let field = |i: usize| record[i].trim();
        let mut bad = None;
        for (col, name) in [(user, &spec.user), (item, &spec.item)] {
            if field(col).is_empty() {
                bad = Some(parse_error(path, line, name, "", "empty id"));
            }
        }
        let t = field(time);
        let parsed_time = t.parse::<i64>().ok();
        if parsed_time.is_none() {
            bad = bad.or_else(|| Some(parse_error(path, line, &spec.time, t, "not an integer timestamp")));
        }
        let parsed_value = match value {
            Some(c) => match field(c).parse::<f32>() {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    let name = spec.value.as_deref().unwrap_or_default();
                    bad = bad.or_else(|| Some(parse_error(path, line, name, field(c), "not a number")));
                    None
                }
            },
            None => None,
        };
        if let Some(err) = bad {
            reject(&mut log, skip_bad_rows, err)?;
            continue;
        }
        log.events.push(Event {
            user: field(user).to_string(),
            item: field(item).to_string(),
            category: category.map_or_else(|| "0".to_string(), |c| field(c).to_string()),
            time: parsed_time.unwrap_or_default(),
            behavior: behavior.map(|c| field(c).to_string()),
            value: parsed_value,
            profile: Vec::new(),
            line,
        });
    }
    if log.events.is_empty() {
        return Err(Error::EmptyFile { path: path.clone() });
    }
    Ok(log)
}

/// Numbered lines of a file split into fields.
type Rows = Vec<(u64, Vec<String>)>;

/// The non-blank lines of a MovieLens file split at `sep`; lines without
/// exactly `width` fields are errors, or skipped into `log` under `skip`.
fn read_fields(path: &Path, sep: &str, width: usize, log: &mut Log, skip: bool) -> Result<(PathBuf, Rows)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "cannot read MovieLens file", e))?;
    // u.item and movies.dat have Latin-1 titles: decode lossily, titles are not used.
    let text = String::from_utf8_lossy(&bytes);
    let mut rows = Vec::new();
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (line, fields): (u64, Vec<String>) = (i as u64 + 1, l.split(sep).map(|s| s.trim().to_string()).collect());
        if fields.len() == width {
            rows.push((line, fields));
        } else {
            let err = Error::RowLength {
                path: path.to_path_buf(),
                line,
                expected: width,
                found: fields.len(),
            };
            reject(log, skip, err)?;
        }
    }
    Ok((path.to_path_buf(), rows))
}

/// Reads a MovieLens folder, whichever release it is, by the files present:
///
/// * 100K: `u.data` (user, item, rating, time, tab-separated), `u.item` (the
///   first of the 19 genre flags is the item's category), `u.user` (age,
///   gender, occupation as profile fields);
/// * 1M: `ratings.dat`, `movies.dat` (the first genre is the category) and
///   `users.dat` (the same profile fields), `::`-separated;
/// * latest, 20M, 25M, 32M: `ratings.csv` and `movies.csv` (the first genre
///   is the category), with headers; they have no user profile.
pub fn read_movielens(dir: &Path, skip_bad_rows: bool) -> Result<Log> {
    if dir.join("u.data").is_file() {
        read_ml_100k(dir, skip_bad_rows)
    } else if dir.join("ratings.dat").is_file() {
        read_ml_1m(dir, skip_bad_rows)
    } else if dir.join("ratings.csv").is_file() {
        read_ml_csv(dir, skip_bad_rows)
    } else {
        Err(Error::config(
            "input",
            dir.display(),
            "not a MovieLens folder: expected u.data (100K), ratings.dat (1M) or ratings.csv (latest, 20M, 25M)",
        ))
    }
}

/// The first of `genres` (`|`-separated names), `none` when there is none.
fn first_genre(genres: &str) -> String {
    genres
        .split('|')
        .map(str::trim)
        .find(|g| !g.is_empty())
        .unwrap_or("none")
        .to_string()
}

type Lookup = std::collections::HashMap<String, Vec<String>>;

fn read_ml_100k(dir: &Path, skip_bad_rows: bool) -> Result<Log> {
    let mut log = Log {
        profile_fields: vec!["age".into(), "gender".into(), "occupation".into()],
        ..Log::default()
    };
    let (_, items) = read_fields(&dir.join("u.item"), "|", 24, &mut log, skip_bad_rows)?;
    let mut genre = std::collections::HashMap::new();
    for (_, f) in items {
        let first = f[5..]
            .iter()
            .position(|g| g == "1")
            .map_or_else(|| "none".to_string(), |g| g.to_string());
        genre.insert(f[0].clone(), first);
    }
    let (_, users) = read_fields(&dir.join("u.user"), "|", 5, &mut log, skip_bad_rows)?;
    let profile: Lookup = users
        .into_iter()
        .map(|(_, f)| (f[0].clone(), vec![f[1].clone(), f[2].clone(), f[3].clone()]))
        .collect();
    let ratings = read_fields(&dir.join("u.data"), "\t", 4, &mut log, skip_bad_rows)?;
    add_ratings(log, skip_bad_rows, ratings, &genre, ("u.item", "u.user"), &profile)
}

/// Adds the rows of a ratings file (user, item, rating, time) to `log`,
/// rejecting a row that does not parse or names an unknown movie or user
/// (with file, line, column and value); a log left without any is an error
/// naming the file.
fn add_ratings(
    mut log: Log,
    skip: bool,
    (path, rows): (PathBuf, Rows),
    genre: &std::collections::HashMap<String, String>,
    (movies, users): (&str, &str),
    profile: &Lookup,
) -> Result<Log> {
    for (line, f) in rows {
        let [user, item, rating, time] = [&f[0], &f[1], &f[2], &f[3]];
        let value = rating.parse::<f32>().ok().filter(|r| r.is_finite());
        let t = time.parse::<i64>().ok();
        let err = match (value, t, genre.get(item), profile.get(user)) {
            (None, ..) => parse_error(&path, line, "rating", rating, "not a number"),
            (_, None, ..) => parse_error(&path, line, "timestamp", time, "not an integer timestamp"),
            (_, _, None, _) => parse_error(&path, line, "item", item, &format!("not in {movies}")),
            (_, _, _, None) => parse_error(&path, line, "user", user, &format!("not in {users}")),
            (Some(value), Some(time), Some(category), Some(p)) => {
                log.events.push(Event {
                    user: user.clone(),
                    item: item.clone(),
                    category: category.clone(),
                    time,
                    behavior: None,
                    value: Some(value),
                    profile: p.clone(),
                    line,
                });
                continue;
            }
        };
        reject(&mut log, skip, err)?;
    }
    if log.events.is_empty() {
        return Err(Error::EmptyFile { path });
    }
    Ok(log)
}

fn read_ml_1m(dir: &Path, skip_bad_rows: bool) -> Result<Log> {
    let mut log = Log {
        profile_fields: vec!["age".into(), "gender".into(), "occupation".into()],
        ..Log::default()
    };
    let (_, movies) = read_fields(&dir.join("movies.dat"), "::", 3, &mut log, skip_bad_rows)?;
    let genre = movies
        .into_iter()
        .map(|(_, f)| (f[0].clone(), first_genre(&f[2])))
        .collect();
    // users.dat: UserID::Gender::Age::Occupation::Zip-code.
    let (_, users) = read_fields(&dir.join("users.dat"), "::", 5, &mut log, skip_bad_rows)?;
    let profile: Lookup = users
        .into_iter()
        .map(|(_, f)| (f[0].clone(), vec![f[2].clone(), f[1].clone(), f[3].clone()]))
        .collect();
    let ratings = read_fields(&dir.join("ratings.dat"), "::", 4, &mut log, skip_bad_rows)?;
    add_ratings(
        log,
        skip_bad_rows,
        ratings,
        &genre,
        ("movies.dat", "users.dat"),
        &profile,
    )
}

/// The CSV releases: `ratings.csv` is a delimited log that [`read_log`]
/// reads; `movies.csv` (quoted titles) gives each movie's first genre.
fn read_ml_csv(dir: &Path, skip_bad_rows: bool) -> Result<Log> {
    let ratings = LogSpec {
        category: None,
        value: Some("rating".into()),
        ..LogSpec::csv(dir.join("ratings.csv"), "userId", "movieId", "", "timestamp")
    };
    let mut log = read_log(&ratings, skip_bad_rows)?;
    let movies = dir.join("movies.csv");
    let file = File::open(&movies).map_err(|e| Error::io(&movies, "cannot open MovieLens file", e))?;
    let mut reader = csv::Reader::from_reader(BufReader::new(file));
    let mut genre = std::collections::HashMap::new();
    for row in reader.records() {
        let row = row.map_err(|e| Error::Csv {
            path: movies.clone(),
            line: e.position().map_or(0, |p| p.line()),
            message: e.to_string(),
        })?;
        // movieId,title,genres
        match (row.get(0), row.get(2)) {
            (Some(id), Some(g)) => {
                genre.insert(id.trim().to_string(), first_genre(g));
            }
            _ => {
                let line = row.position().map_or(0, |p| p.line());
                let found = row.len();
                let err = Error::RowLength {
                    path: movies.clone(),
                    line,
                    expected: 3,
                    found,
                };
                reject(&mut log, skip_bad_rows, err)?;
            }
        }
    }
    let events = std::mem::take(&mut log.events);
    for mut e in events {
        match genre.get(&e.item) {
            Some(g) => {
                e.category = g.clone();
                log.events.push(e);
            }
            None => {
                let err = parse_error(&ratings.path, e.line, "item", &e.item, "not in movies.csv");
                reject(&mut log, skip_bad_rows, err)?;
            }
        }
    }
    if log.events.is_empty() {
        return Err(Error::EmptyFile { path: ratings.path });
    }
    Ok(log)
}
